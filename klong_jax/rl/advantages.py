"""Group-relative advantages over G episodes of the same task (one group), in numpy.

Every episode gets one scalar advantage; the trainer gives it to every generated assistant token of that
episode. A group whose rewards are all equal (within `equal_tol`) has no relative signal: its advantages
are 0 and `valid_mask` marks it False, so the caller can skip its episodes and count them (dynamic
sampling). Methods:
  grpo     (r - mean) / (std + eps), std the POPULATION std of the group (ddof=0);
  dr_grpo  r - mean (Dr. GRPO: no std scaling, so easy/hard groups are not up-weighted);
  rloo     r - mean of the other G-1 rewards (leave-one-out baseline) = G / (G - 1) * (r - mean); G >= 2.
"""
import numpy as np

METHODS = ("grpo", "dr_grpo", "rloo")


def _as_groups(rewards_G_or_NG, name: str) -> np.ndarray:
    rewards = np.asarray(rewards_G_or_NG)
    if rewards.ndim not in (1, 2):
        raise ValueError(f"{name}: expected shape [G] or [num_groups, G], got {rewards.shape}")
    if rewards.shape[-1] < 1:
        raise ValueError(f"{name}: a group needs at least one episode, got shape {rewards.shape}")
    if not np.issubdtype(rewards.dtype, np.number) or np.issubdtype(rewards.dtype, np.complexfloating):
        raise ValueError(f"{name}: rewards must be real numbers, got dtype {rewards.dtype}")
    rewards = rewards.astype(np.float64)
    if not np.all(np.isfinite(rewards)):
        bad = np.argwhere(~np.isfinite(rewards))[0].tolist()
        raise ValueError(f"{name}: non-finite reward at index {bad}")
    return rewards


def group_advantages(rewards_G_or_NG, method: str = "grpo", eps: float = 1e-6, equal_tol: float = 1e-6):
    """Advantages for rewards shaped [G] or [num_groups, G].

    Returns (advantages, valid_mask): advantages float32 with the rewards' shape; valid_mask bool with
    the shape of the group axes (`rewards.shape[:-1]`: [num_groups], or [] for a single group). A group
    is invalid when max - min <= equal_tol; its advantages are exactly 0.
    Math is done in float64 so that small reward differences survive the std division.
    """
    if method not in METHODS:
        raise ValueError(f"group_advantages: method must be one of {METHODS}, got {method!r}")
    if eps < 0 or equal_tol < 0:
        raise ValueError(f"group_advantages: eps ({eps}) and equal_tol ({equal_tol}) must be >= 0")
    rewards = _as_groups(rewards_G_or_NG, "group_advantages(rewards)")
    group_size = rewards.shape[-1]
    if method == "rloo" and group_size < 2:
        raise ValueError(f"group_advantages: rloo needs G >= 2 episodes per group, got G={group_size}")

    mean = rewards.mean(axis=-1, keepdims=True)
    centred = rewards - mean
    if method == "grpo":
        advantages = centred / (rewards.std(axis=-1, ddof=0, keepdims=True) + eps)
    elif method == "dr_grpo":
        advantages = centred
    else:
        # r_i - (sum - r_i) / (G - 1) simplifies to G / (G - 1) * (r_i - mean).
        advantages = centred * (group_size / (group_size - 1))

    valid_mask = np.ptp(rewards, axis=-1) > equal_tol
    advantages = np.where(valid_mask[..., None], advantages, 0.0)
    return advantages.astype(np.float32), valid_mask


def advantage_stats(rewards_G_or_NG, valid_mask) -> dict:
    """Logging figures for one batch of groups: counts of groups (total, skipped, valid), the fraction
    skipped, and the reward mean / population std / min / max over all episodes of the batch."""
    rewards = _as_groups(rewards_G_or_NG, "advantage_stats(rewards)")
    valid = np.asarray(valid_mask, dtype=bool)
    if valid.shape != rewards.shape[:-1]:
        raise ValueError(f"advantage_stats: valid_mask shape {valid.shape} does not match the group axes "
                         f"{rewards.shape[:-1]} of rewards {rewards.shape}")
    total = int(valid.size)
    skipped = int(total - np.count_nonzero(valid))
    stats = {"groups_total": total, "groups_skipped": skipped, "groups_valid": total - skipped,
             "skip_fraction": skipped / total if total else 0.0, "episodes": int(rewards.size)}
    if rewards.size == 0:  # an empty batch (no groups) logs zeros rather than numpy's NaN warnings
        return stats | {"reward_mean": 0.0, "reward_std": 0.0, "reward_min": 0.0, "reward_max": 0.0}
    return stats | {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(ddof=0)),
                    "reward_min": float(rewards.min()), "reward_max": float(rewards.max())}
