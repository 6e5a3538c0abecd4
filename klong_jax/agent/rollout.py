"""RL training rows of an episode: its windows, with what the sampler recorded laid over them.

Window k of an episode holds `prefix + turns[s_k..e_k-1] + message of turn e_k` as the agent's
context held them (the sampled ids); its turns g_k..e_k were generated there. Per position t of the
window (next-token convention of `klong_jax.data.splitting`: position t predicts targets[t]):
- loss_mask[t] = 1 when targets[t] is a sampled token of a turn generated in this window (tokens
  appended after a cut-off were not sampled and carry no loss);
- old_logprobs[t] / sampling_logprobs[t]: the sampler's log-prob of targets[t] (0 elsewhere);
- routed_experts[:, t]: the experts token t was routed to at sampling time: the sampled tokens as
  they were fed during their own generation, every other position from the prompt of the window's
  turn that first held it; routing_known[t] is False where nothing was recorded (then -1).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from klong_jax.agent.records import EpisodeResult


@dataclass(frozen=True)
class RolloutWindow:
    index: int
    start_turn: int
    generated_turns: tuple[int, ...]
    input_ids: np.ndarray                    # int32 [T]
    targets: np.ndarray                      # int32 [T]
    positions: np.ndarray                    # int32 [T]
    loss_mask: np.ndarray                    # int32 [T]
    old_logprobs: np.ndarray | None          # float32 [T]
    sampling_logprobs: np.ndarray | None     # float32 [T]
    routed_experts: np.ndarray | None        # int32 [L_moe, T, k]
    routing_known: np.ndarray | None         # bool [T]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def rollout_windows(result: EpisodeResult) -> list[RolloutWindow]:
    """One row per window the episode's turns were generated in."""
    out = []
    for window in result.windows():
        T = len(window)
        turns = [result.turns[j] for j in window.generated_turns]
        loss_mask = np.zeros(T, np.int32)
        have_lp = all(t.logprobs is not None for t in turns)
        have_slp = all(t.sampling_logprobs is not None for t in turns)
        old_lp = np.zeros(T, np.float32) if have_lp else None
        samp_lp = np.zeros(T, np.float32) if have_slp else None
        for t in turns:
            n = int(t.sampled_ids.shape[0])
            # Sampled token i sits at position prompt_len + i; it is predicted from the one before.
            pred = np.arange(t.prompt_len - 1, t.prompt_len - 1 + n)
            if not np.array_equal(window.input_ids[pred + 1], t.sampled_ids):
                raise RuntimeError(f"episode {result.episode_id} turn {t.index}: the window does "
                                     "not hold the sampled ids where the record puts them")
            loss_mask[pred] = 1
            if old_lp is not None:
                old_lp[pred] = t.logprobs
            if samp_lp is not None:
                samp_lp[pred] = t.sampling_logprobs
        routed, known = _window_routing(turns, T)
        out.append(RolloutWindow(window.index, window.start_turn, window.generated_turns,
                                 window.input_ids, window.targets, window.positions, loss_mask,
                                 old_lp, samp_lp, routed, known))
    return out


def _window_routing(turns, T: int):
    shapes = [t.routed_experts.shape for t in turns if t.routed_experts is not None]
    shapes += [t.prompt_routed_experts.shape for t in turns if t.prompt_routed_experts is not None]
    if not shapes:
        return None, None
    L, k = shapes[0][0], shapes[0][2]
    routed = np.full((L, T, k), -1, np.int32)
    known = np.zeros(T, bool)
    for t in turns:   # prompt routing first: sampled tokens' own routing overrides it below
        if t.prompt_routed_experts is not None:
            span = slice(t.prompt_routing_from, t.prompt_len)
            routed[:, span] = t.prompt_routed_experts
            known[span] = True
    for t in turns:
        if t.routed_experts is not None:
            n = t.routed_experts.shape[1]
            routed[:, t.prompt_len:t.prompt_len + n] = t.routed_experts
            known[t.prompt_len:t.prompt_len + n] = True
    return routed, known
