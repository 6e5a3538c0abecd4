"""Many episodes at once: G episodes per task, stepped together, one batched generate per step.

    results = run_episodes(tasks, policy, n_per_task=G, template=template, config=agent_config,
                           pool=SandboxPool(max_concurrent=16), workdir=DIR)

Each step asks every live episode for its next turn and sends all the prompts to the policy in one
`generate` call; tool calls then run in parallel threads (they wait on sandboxed processes, not on
Python). Episodes end at different steps; a finished episode's sandbox is closed (its processes
killed, as at the end of a PaperBench run) and the episode is graded in a fresh sandbox on the same
directory, while a waiting episode takes its place. At most `pool.max_concurrent` episodes (plus
gradings) hold a sandbox at once.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence

from klong_jax.agent.config import AgentConfig
from klong_jax.agent.episode import AgentEpisode
from klong_jax.agent.policy import GenerationParams, Policy
from klong_jax.agent.records import EpisodeResult
from klong_jax.data.template_base import ChatTemplate
from klong_jax.data.context import ContextPolicy
from klong_jax.sandbox import SandboxLimits, SandboxPool
from klong_jax.tasks.grading import grade_episode_result
from klong_jax.tasks.task import Task

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Live:
    episode: AgentEpisode
    task: Task
    directory: str
    sandbox_cm: contextlib.AbstractContextManager


@dataclasses.dataclass(frozen=True)
class RolloutProgress:
    """Where a `run_episodes` call stands after a batched step (one generate for every live episode)."""
    step: int                      # batched steps so far
    done: int                      # episodes finished (and graded)
    total: int
    live: int                      # episodes running now
    pending: int                   # episodes not started yet
    max_concurrent: int
    max_turns: int
    live_turns: tuple[int, ...]    # assistant turns each live episode has taken
    sampled_tokens: int            # tokens generated so far, all episodes
    elapsed_s: float

    def steps_left_bound(self) -> int:
        """At most this many batched steps remain: the longest live episode's turns left, then the pending
        episodes in waves of max_concurrent, each up to max_turns (episodes may end sooner: submit, timeout)."""
        live_left = max((self.max_turns - t for t in self.live_turns), default=0)
        waves = -(-self.pending // self.max_concurrent)
        return live_left + waves * self.max_turns

    def line(self) -> str:
        rate = self.sampled_tokens / max(self.elapsed_s, 1e-9)
        eta = self.steps_left_bound() * self.elapsed_s / max(self.step, 1)
        return (f"step {self.step} | episodes {self.done}/{self.total} done, {self.live} running | sampled "
                f"{self.sampled_tokens} tokens, {rate:.1f} tokens/s | elapsed {clock_text(self.elapsed_s)} | "
                f"ETA <= {clock_text(eta)}")


def clock_text(seconds: float) -> str:
    """Seconds as `12m05s` (or `1h02m05s`), for progress lines."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m{s:02d}s" if m >= 60 else f"{m}m{s:02d}s"


def generation_params(config: AgentConfig, template: ChatTemplate, max_new_tokens: int, *,
                      return_routing: bool = False, return_prompt_routing: bool = False
                      ) -> GenerationParams:
    return GenerationParams(max_new_tokens=max_new_tokens, stop_token_ids=tuple(template.stop_ids),
                            temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                            return_routing=return_routing,
                            return_prompt_routing=return_prompt_routing,
                            stop_strings=(template.call_end_text,) if config.one_call_per_turn else ())


def episode_limits(pool: SandboxPool, config: AgentConfig) -> SandboxLimits:
    """The pool's limits with the episode's wall-clock timeout, so that a long command is killed
    when the episode's time is up, and the agent config's disk limit if it sets one."""
    limits = pool.limits or SandboxLimits()
    changes = {"episode_timeout_s": config.timeout_s}
    if config.command_timeout_s is not None:
        changes["command_timeout_s"] = config.command_timeout_s
    if config.disk_mib:
        changes["disk_bytes"] = config.disk_mib << 20
    return dataclasses.replace(limits, **changes)


def run_episodes(tasks: Sequence[Task], policy: Policy, *, n_per_task: int, template: ChatTemplate,
                 config: AgentConfig, pool: SandboxPool, workdir: str, tag: str = "",
                 grade: bool = True, keep_dirs: bool = False, return_routing: bool = False,
                 return_prompt_routing: bool = False,
                 on_result: Callable[[EpisodeResult], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 timings: dict[str, float] | None = None,
                 on_step: Callable[[RolloutProgress], None] | None = None) -> list[EpisodeResult]:
    """Runs n_per_task episodes of every task; results in (task, group index) order.

    Episode ids are `{tag}{task_id}-g{g}`; each runs in `workdir/<episode id>` (which must not hold
    files yet), removed after grading unless keep_dirs. reward is the rubric score of the episode
    as it stands when it ends (partial credit); None when grade is False. return_routing /
    return_prompt_routing: record the routed experts of sampled / prompt tokens (MoE routing
    replay; see rollout.py). timings: if given, wall seconds of the rollout's phases are added to it:
    `sampling_s` (the policy), `tools_s` (tool calls), `grading_s` (closing each episode's sandbox and
    grading it); the phases run one after another, so they add up to the rollout's wall time. A policy
    with `stats` (a SamplerPolicy) also adds `prefill_tokens` (prompt tokens the model ran) and
    `reused_tokens` (prompt tokens whose cached k/v it kept from the episode's previous turn).
    A policy with `end_episode(episode_id)` is told when an episode ends (its cached context is freed).
    on_step: called after every batched step with a RolloutProgress (for progress lines)."""
    timings = {} if timings is None else timings
    for phase in ("sampling_s", "tools_s", "grading_s"):
        timings.setdefault(phase, 0.0)
    stats = getattr(policy, "stats", None)
    if stats is not None:
        for key in ("prefill_tokens", "reused_tokens"):
            timings.setdefault(key, 0)
    end_episode = getattr(policy, "end_episode", None)
    if n_per_task < 1:
        raise ValueError(f"n_per_task must be >= 1, got {n_per_task}")
    ids = [t.task_id for t in tasks]
    if len(set(ids)) != len(ids):
        repeated = sorted(i for i in set(ids) if ids.count(i) > 1)
        raise ValueError(f"duplicate task ids in the batch: {repeated}")
    if config.one_call_per_turn and template.call_end_text is None:
        raise ValueError(f"agent.one_call_per_turn=True: the {template.name} template closes tool calls with a "
                         "special token, not text; set agent.one_call_per_turn=False")
    context_policy = ContextPolicy(template, config.context)
    limits = episode_limits(pool, config)
    pending = collections.deque((task, g) for task in tasks for g in range(n_per_task))
    order = {f"{tag}{task.task_id}-g{g}": i for i, (task, g) in enumerate(pending)}
    results: dict[str, EpisodeResult] = {}
    live: list[_Live] = []
    started, steps, sampled = time.perf_counter(), 0, 0

    def start(task: Task, g: int) -> _Live:
        episode_id = f"{tag}{task.task_id}-g{g}"
        directory = os.path.join(workdir, episode_id)
        if os.path.isdir(directory) and os.listdir(directory):
            raise FileExistsError(f"episode directory {directory} is not empty (a previous run's? "
                                  "use another workdir or tag)")
        task.setup(directory)   # before the sandbox: it hands the directory to its own user
        cm = pool.episode(directory, limits=limits)
        sandbox = cm.__enter__()
        episode = AgentEpisode(episode_id, task, g, sandbox, context_policy, config, clock=clock)
        return _Live(episode, task, directory, cm)

    def advance(item_completion) -> None:
        item, completion = item_completion
        try:
            item.episode.advance(completion)
        except Exception as e:   # a sandbox that cannot start, a failing host: end this episode only
            log.exception("episode %s failed", item.episode.episode_id)
            item.episode.fail(e)

    def finalize(item: _Live) -> EpisodeResult:
        item.sandbox_cm.__exit__(None, None, None)   # kills what the agent left running
        result = item.episode.result()
        if grade:
            _grade(result, item.task, item.directory, pool, config.grade_timeout_s)
        if not keep_dirs:
            shutil.rmtree(item.directory, ignore_errors=True)
        return result

    with concurrent.futures.ThreadPoolExecutor(max_workers=pool.max_concurrent) as executor:
        try:
            while pending or live:
                while pending and len(live) < pool.max_concurrent:
                    live.append(start(*pending.popleft()))
                asks = [(item, ask) for item in live if (ask := item.episode.next_request())]
                if asks:
                    requests = [request for _, (request, _) in asks]
                    params = generation_params(
                        config, template, max(r.max_new_tokens for r in requests),
                        return_routing=return_routing, return_prompt_routing=return_prompt_routing)
                    before = dict(stats) if stats is not None else None
                    t0 = time.perf_counter()
                    completions = policy.generate([prompt for _, (_, prompt) in asks], params,
                                                  requests=requests)
                    t1 = time.perf_counter()
                    timings["sampling_s"] += t1 - t0
                    if stats is not None:
                        for key in ("prefill_tokens", "reused_tokens"):
                            timings[key] += stats.get(key, 0) - before.get(key, 0)
                    if len(completions) != len(asks):
                        raise RuntimeError(f"policy returned {len(completions)} completions for "
                                           f"{len(asks)} prompts")
                    list(executor.map(advance, [(item, c) for (item, _), c in zip(asks, completions)]))
                    timings["tools_s"] += time.perf_counter() - t1
                    steps += 1
                    sampled += sum(len(c.tokens) for c in completions)
                done = [item for item in live if item.episode.finished]
                live = [item for item in live if not item.episode.finished]
                if end_episode is not None:
                    for item in done:
                        end_episode(item.episode.episode_id)
                t0 = time.perf_counter()
                for result in executor.map(finalize, done):
                    results[result.episode_id] = result
                    if on_result is not None:
                        on_result(result)
                timings["grading_s"] += time.perf_counter() - t0
                if on_step is not None and asks:
                    on_step(RolloutProgress(
                        step=steps, done=len(results), total=len(order), live=len(live), pending=len(pending),
                        max_concurrent=pool.max_concurrent, max_turns=config.max_turns,
                        live_turns=tuple(len(item.episode.turns) for item in live), sampled_tokens=sampled,
                        elapsed_s=time.perf_counter() - started))
        finally:
            for item in live:   # an exception (policy, interrupt): no sandbox is left running
                item.sandbox_cm.__exit__(None, None, None)
                if end_episode is not None:
                    end_episode(item.episode.episode_id)
    return sorted(results.values(), key=lambda r: order[r.episode_id])


def _grade(result: EpisodeResult, task: Task, directory: str, pool: SandboxPool,
           timeout_s: float) -> None:
    """Grades in a fresh sandbox on the episode's directory (the episode's own may have expired)."""
    try:
        with pool.episode(directory) as sandbox:
            graded = grade_episode_result(task, sandbox, timeout_s)
    except Exception as e:
        log.exception("grading episode %s failed", result.episode_id)
        result.reward, result.grade_valid = None, False
        result.error = (result.error + "; " if result.error else "") + \
            f"grading failed: {type(e).__name__}: {e}"
        return
    result.reward = float(graded.score)
    result.grade_valid = bool(graded.valid)
    result.grade = graded.summary()
