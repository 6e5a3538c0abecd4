"""Episodes -> packed RL training rows.

Each episode is split into the windows it was generated in (recorded by the agent: the same ContextPolicy
as SFT). Every sampled assistant token carries the episode's advantage; the sampler's log-probs and, for
routing replay, its routed experts ride along each token as extra fields through shared-prefix packing.
"""
import numpy as np

from klong_jax.agent.rollout import rollout_windows
from klong_jax.data.packing import pack_trajectories

RL_FIELDS = ("rl_mask", "advantages", "sampler_logprobs", "routed")


def episode_extras(result, advantage: float, num_moe_layers: int, top_k: int) -> list[dict]:
    extras = []
    for rw in rollout_windows(result):
        T = len(rw)
        mask = rw.loss_mask.astype(np.int32)
        logp = rw.sampling_logprobs if rw.sampling_logprobs is not None else np.zeros(T, np.float32)
        if rw.routed_experts is not None:
            routed = np.ascontiguousarray(rw.routed_experts.transpose(1, 0, 2)).astype(np.int32)   # [T, L, k]
        else:
            routed = np.full((T, num_moe_layers, top_k), -1, np.int32)
        extras.append({"rl_mask": mask, "advantages": (mask * advantage).astype(np.float32),
                       "sampler_logprobs": (logp * mask).astype(np.float32), "routed": routed})
    return extras


def build_rows(results, advantages_by_episode: dict, *, seq_len: int, pad_id: int, num_moe_layers: int,
               top_k: int, packing: str = "shared_prefix"):
    """Rows (dicts of [T] / [T, L, k] arrays) for the episodes that carry an advantage, and PackStats."""
    windows, extras = [], []
    for r in results:
        adv = advantages_by_episode.get(r.episode_id)
        if adv is None or adv == 0.0:
            continue
        wins = r.windows()
        if not wins:
            continue
        windows.append(wins)
        extras.append(episode_extras(r, adv, num_moe_layers, top_k))
    if not windows:
        return [], None
    rows, stats = pack_trajectories(windows, seq_len, mode=packing, pad_id=pad_id, extras_per_trajectory=extras)
    for row in rows:   # padding tokens: no loss, routing unknown
        pad = row["doc_ids"] == 0
        row["rl_mask"][pad] = 0
        row["routed"][pad] = -1
    return rows, stats


def to_batches(rows: list[dict], batch_rows: int) -> list[dict]:
    """Stack rows into [batch_rows, ...] batches; the last one is filled with empty rows (no loss)."""
    batches = []
    for i in range(0, len(rows), batch_rows):
        chunk = rows[i:i + batch_rows]
        while len(chunk) < batch_rows:
            chunk.append({k: np.zeros_like(v) if k != "routed" else np.full_like(v, -1) for k, v in rows[0].items()})
        batches.append({k: np.stack([r[k] for r in chunk]) for k in rows[0]})
    return batches
