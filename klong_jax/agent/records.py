"""What an episode leaves behind: the trajectory (data format), and per turn what was sampled where.

For RL every assistant turn j records the context it was generated in (its window: the policy's
start s_j; the prompt is `prefix + turns[s_j..j-1] + generation prompt`, rebuilt exactly by
`prompt_ids(j)`), the sampled ids, their log-probs and routed experts. `windows()` gives the windows
the turns were generated in, token for token what the model saw; for an episode whose turns all
render canonically (`exact_replay`), `split(trajectory, policy)` reproduces them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from klong_jax.data.context import Episode
from klong_jax.data.splitting import Window, windows_from_episode
from klong_jax.data.trajectory import Message, Trajectory

FINISH_REASONS = ("submit", "timeout", "max_turns", "max_tokens", "context_overflow", "error")


@dataclass
class TurnRecord:
    index: int                        # j
    start: int                        # s_j: the context was prefix + turns[s_j..j-1]
    window: int                       # the window it was generated in (a new one at each drop)
    prompt_len: int                   # tokens of the prompt, the generation prompt included
    sampled_ids: np.ndarray           # int32 [n]
    logprobs: np.ndarray | None       # float32 [n]: log p(token | prompt), temperature 1
    sampling_logprobs: np.ndarray | None   # float32 [n]: under the distribution sampled from
    routed_experts: np.ndarray | None  # int32 [L_moe, n, k]: each sampled token as it was fed
    # Routed experts of the prompt positions [prompt_routing_from, prompt_len) (None: not asked
    # for): the whole prompt for the first turn of a window, else what is new since the previous
    # turn's prompt (that turn's message and its observations), so a window's turns cover it once.
    prompt_routed_experts: np.ndarray | None
    prompt_routing_from: int
    n_forced: int                     # end-of-turn token appended (cut off, or another stop
                                      # token than the message's own): not sampled
    finish: str                       # "stop" | "length"
    canonical: bool                   # the sampled ids are the template's rendering of the message
    parse_errors: tuple[str, ...]
    tools: tuple[str, ...]            # names of the calls that ran

    def meta(self) -> dict:
        return {"turn": self.index, "start": self.start, "window": self.window,
                "prompt_len": self.prompt_len, "n_sampled": int(self.sampled_ids.shape[0]),
                "n_forced": self.n_forced, "finish": self.finish, "canonical": self.canonical,
                "parse_errors": list(self.parse_errors), "tools": list(self.tools)}


@dataclass
class EpisodeResult:
    episode_id: str
    task_id: str
    group_index: int                  # g of the task's G episodes
    finish_reason: str
    messages: list[Message]           # the full episode (tool results not truncated)
    turns: list[TurnRecord]
    context: Episode | None           # the ContextPolicy's state: exact ids of every turn (None:
                                      # the prefix alone overflowed the budget)
    elapsed_s: float
    reward: float | None = None       # rubric score; None when not graded
    grade_valid: bool | None = None   # every rubric leaf graded (False: some check failed to run)
    error: str | None = None          # what went wrong when finish_reason == "error"
    grade: dict | None = field(default=None, repr=False)   # GradeResult.summary()

    @property
    def submitted(self) -> bool:
        return self.finish_reason == "submit"

    @property
    def sampled_tokens(self) -> int:
        return sum(int(t.sampled_ids.shape[0]) for t in self.turns)

    @property
    def exact_replay(self) -> bool:
        """Whether split(trajectory) reproduces windows(): every turn rendered canonically."""
        return all(t.canonical and not t.n_forced for t in self.turns)

    def windows(self, *, train_overlap: bool = False) -> list[Window]:
        """The windows the turns were generated in, with the ids the model really saw."""
        if self.context is None:
            return []
        return windows_from_episode(self.context, train_overlap=train_overlap)

    def prompt_ids(self, turn: int) -> np.ndarray:
        """The exact prompt of turn `turn`: prefix + turns[start..turn-1] + generation prompt."""
        ctx, record = self.context, self.turns[turn]
        parts = [ctx.prefix_ids] + [t.ids for t in ctx.turns[record.start:turn]]
        parts.append(np.asarray(ctx.template.generation_prompt_ids, np.int32))
        return np.concatenate(parts)

    def meta(self) -> dict:
        windows = {}
        for t in self.turns:
            windows.setdefault(t.window, {"index": t.window, "start_turn": t.start,
                                          "generated_turns": []})["generated_turns"].append(t.index)
        return {"source": "agent", "episode_id": self.episode_id, "group_index": self.group_index,
                "finish_reason": self.finish_reason, "elapsed_s": round(self.elapsed_s, 3),
                "n_turns": len(self.turns), "sampled_tokens": self.sampled_tokens,
                "submitted": self.submitted, "exact_replay": self.exact_replay,
                "grade_valid": self.grade_valid, "error": self.error,
                "windows": list(windows.values()), "turns": [t.meta() for t in self.turns]}

    def trajectory(self) -> Trajectory:
        return Trajectory(self.episode_id, self.task_id, tuple(self.messages), self.meta(),
                          self.reward)

    def save_arrays(self, path: str) -> None:
        """Sampled ids, log-probs and routed experts of every turn, as one .npz."""
        arrays = {}
        for t in self.turns:
            arrays[f"sampled_ids_{t.index}"] = t.sampled_ids
            if t.logprobs is not None:
                arrays[f"logprobs_{t.index}"] = t.logprobs
            if t.sampling_logprobs is not None:
                arrays[f"sampling_logprobs_{t.index}"] = t.sampling_logprobs
            if t.routed_experts is not None:
                arrays[f"routed_experts_{t.index}"] = t.routed_experts
            if t.prompt_routed_experts is not None:
                arrays[f"prompt_routed_experts_{t.index}"] = t.prompt_routed_experts
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        np.savez_compressed(path, **arrays)

    def summary(self) -> dict:
        return {"episode_id": self.episode_id, "task_id": self.task_id, "reward": self.reward,
                "finish_reason": self.finish_reason, "turns": len(self.turns),
                "sampled_tokens": self.sampled_tokens, "elapsed_s": round(self.elapsed_s, 3),
                "grade_valid": self.grade_valid, "error": self.error}

    def to_json(self) -> str:
        return json.dumps(self.trajectory().to_dict(), ensure_ascii=False)
