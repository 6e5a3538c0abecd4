"""Teacher rollouts with rejection sampling: the agent, driven by a teacher model behind a chat endpoint, works
each task in the sandbox under the episode timeout; the rubric grades it; episodes scoring at least the
threshold are kept and written as trajectory JSONL that SFT reads (`configs/sft.py`: `data.train_paths`).

    endpoint = ChatEndpoint(base_url, "teacher-model", timeout_s=600, max_attempts=4)
    report = run_teacher(tasks, endpoint, template=template, config=agent_config, pool=SandboxPool(8),
                         workdir=DIR, out_path="teacher.jsonl", n_per_task=2, threshold=0.8)
    report.kept, report.dropped, report.failed, report.scores, report.endpoint["completion_tokens"]

Episodes run through `klong_jax.agent.run_episodes` with a `ChatPolicy` (so the context policy, the tool
parser, the tools and the grading are the agent's own, and each kept trajectory is the conversation the
trained model will see, in its template's token budget). An episode is
- kept: not ended by an error, graded validly, score >= threshold;
- dropped: graded validly below the threshold (rejection sampling);
- failed: ended by an error (the endpoint failed after its retries on one of its turns, or a sandbox failure),
  not validly graded, or without a single assistant turn (e.g. the task's prompt overflows the context: nothing
  to train on). A failure is counted and reported with its error, never kept and never a silent 0.
Kept trajectories are written (atomically: a temporary file renamed into place) with `meta.source =
"teacher"`, `meta.teacher` (the model, the threshold) and `reward` = the score, then read back with
`klong_jax.data.trajectory.read_jsonl` (raising on any invalid record) before the report is returned.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

from klong_jax.agent.chat_policy import ChatPolicy
from klong_jax.agent.config import AgentConfig
from klong_jax.agent.records import EpisodeResult
from klong_jax.agent.runner import run_episodes
from klong_jax.data.template_base import ChatTemplate
from klong_jax.data.trajectory import Trajectory, read_jsonl, write_jsonl
from klong_jax.sandbox import SandboxPool
from klong_jax.tasks.task import Task


@dataclasses.dataclass
class TeacherReport:
    """What a teacher run did. scores: episode id -> rubric score (None: not graded). kept_ids: in the
    written file's order. endpoint: the endpoint's counters over this run (requests, retries, calls,
    failures, invalid, prompt_tokens, completion_tokens; a delta of `endpoint.stats`, which also holds
    other users' calls when the endpoint is shared concurrently). failures: {"episode_id", "error"} each."""
    out_path: str
    threshold: float
    episodes: int
    kept: int
    dropped: int
    failed: int
    scores: dict[str, float | None]
    kept_ids: list[str]
    failures: list[dict[str, Any]]
    finish_reasons: dict[str, int]
    endpoint: dict[str, int]
    turns: int
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def classify(result: EpisodeResult, threshold: float) -> str:
    """"kept", "dropped" or "failed" (module docstring)."""
    if result.finish_reason == "error" or not result.grade_valid or result.reward is None or not result.turns:
        return "failed"
    return "kept" if result.reward >= threshold else "dropped"


def teacher_trajectory(result: EpisodeResult, *, model: str, threshold: float) -> Trajectory:
    """The episode as a training record: the agent's trajectory, its meta marked as the teacher's."""
    trajectory = result.trajectory()
    meta = dict(trajectory.meta or {}, source="teacher", teacher={"model": model, "threshold": threshold})
    return dataclasses.replace(trajectory, meta=meta)


def run_teacher(tasks: Sequence[Task], endpoint: Any, *, template: ChatTemplate, config: AgentConfig,
                pool: SandboxPool, workdir: str, out_path: str, n_per_task: int = 1, threshold: float = 1.0,
                max_workers: int | None = None, max_tokens: int | None = None, tag: str = "teacher-",
                policy: ChatPolicy | None = None, on_step=None) -> TeacherReport:
    """Runs n_per_task teacher episodes of every task (config.timeout_s each, at most pool.max_concurrent at a
    time), grades them, writes the kept ones to out_path (replacing it; an empty file when none is kept) and
    returns the counts. endpoint: a ChatEndpoint (its `model` names the teacher in the records). template: the
    trained model's chat template (its tokens measure the context budget). max_workers: concurrent endpoint
    calls (default pool.max_concurrent). max_tokens: cap on one answer (ChatPolicy). workdir/<tag><task>-g<g>:
    the episode directories (removed after grading). policy: a ChatPolicy to use instead of building one.
    on_step: run_episodes' progress callback (a RolloutProgress after every batched turn)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"run_teacher threshold={threshold} must be in [0, 1] (a rubric score)")
    policy = policy or ChatPolicy(endpoint, template, max_workers=max_workers or pool.max_concurrent,
                                  max_tokens=max_tokens)
    stats = getattr(endpoint, "stats", None)
    before = stats.snapshot() if stats is not None else {}
    started = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    results = run_episodes(tasks, policy, n_per_task=n_per_task, template=template, config=config, pool=pool,
                           workdir=workdir, tag=tag, on_step=on_step)
    after = stats.snapshot() if stats is not None else {}
    model = str(getattr(endpoint, "model", "unknown"))
    kinds = {r.episode_id: classify(r, threshold) for r in results}
    kept = [teacher_trajectory(r, model=model, threshold=threshold) for r in results
            if kinds[r.episode_id] == "kept"]
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    partial = f"{out_path}.partial"
    write_jsonl(partial, kept)
    os.replace(partial, out_path)
    loaded = list(read_jsonl(out_path, on_error="raise"))
    if [t.id for t in loaded] != [t.id for t in kept]:
        raise RuntimeError(f"{out_path}: read back {len(loaded)} trajectories, wrote {len(kept)}")
    failures = [{"episode_id": r.episode_id, "finish_reason": r.finish_reason,
                 "error": r.error or ("no assistant turn" if not r.turns else
                                      "grading invalid" if not r.grade_valid else "not graded")}
                for r in results if kinds[r.episode_id] == "failed"]
    return TeacherReport(
        out_path=out_path, threshold=threshold, episodes=len(results), kept=len(kept),
        dropped=sum(k == "dropped" for k in kinds.values()), failed=len(failures),
        scores={r.episode_id: r.reward for r in results}, kept_ids=[t.id for t in kept], failures=failures,
        finish_reasons=dict(collections.Counter(r.finish_reason for r in results)),
        endpoint={k: after[k] - before.get(k, 0) for k in after}, turns=sum(len(r.turns) for r in results),
        elapsed_s=round(time.perf_counter() - started, 3))
