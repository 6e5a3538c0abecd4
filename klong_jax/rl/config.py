"""The `rl` section of an RL stage config as a typed, documented, range-checked dataclass.

    rl = RLConfig.from_mapping(cfg.rl)      # unknown keys, wrong types and out-of-range values are errors

One convention for "off": 0 (kl_coef, tis_cap, minibatches, loss_chunk); booleans are true/false. Per-variant values
live in configs/rl_common.py (the LOOP table and the stage table); this class only says what each field means and
which values are legal.
"""
from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from klong_jax.config_mapping import known_items
from klong_jax.data.packing import PACK_MODES
from klong_jax.rl.advantages import METHODS


@dataclass(frozen=True)
class RLConfig:
    """One RL stage's loop, objective and batching (klong_method.md; the papers each knob comes from)."""
    # Loop: per step, `tasks_per_step` tasks x `group_size` episodes with the current policy, then the update.
    steps: int                          # RL steps in the stage
    tasks_per_step: int                 # tasks sampled per step (without replacement within a step)
    group_size: int                     # G episodes per task: the group an advantage is relative to (>= 2)
    # Advantages: "grpo" (Shao et al. 2024, DeepSeekMath: (r - mean) / std over the group), "dr_grpo" (Liu et al.
    # 2025, Dr. GRPO: r - mean, no std division: no bias toward low-variance groups), "rloo" (Ahmadian et al. 2024:
    # r - mean of the others). Groups whose rewards are all equal are skipped (no signal).
    advantage: str = "grpo"
    # Clipped surrogate (Schulman et al. 2017, PPO) with asymmetric bounds (Yu et al. 2025, DAPO "clip-higher":
    # eps_high > eps_low lets unlikely tokens of good episodes grow): ratio clipped to [1 - eps_low, 1 + eps_high].
    eps_low: float = 0.2
    eps_high: float = 0.28
    # k3 estimator of KL(pi || pi_ref) to the frozen stage-start policy (Schulman 2020); 0: off (and no reference
    # forward pass).
    kl_coef: float = 0.0
    # Truncated importance sampling against the sampler's own log-probs (Yao et al. 2025: the inference engine's
    # numerics make rollouts slightly off-policy); per-token weight min(pi_old / mu, tis_cap); 0: off.
    tis_cap: float = 2.0
    # MoE routing replay: the trainer's forward uses the experts the sampler chose for each token (Zheng et al.
    # 2025, GSPO; routing mismatch is the main trainer/sampler gap in MoE RL). replay_gap: also compute the
    # log-probs without replay, a metric only (one more forward per batch).
    routing_replay: bool = True
    replay_gap: bool = True
    # Updates: passes over a step's rows (PPO epochs), and optimizer steps per pass: `minibatches` mini-batches of
    # whole batches, each one step on its micro-batches' exactly summed gradients; 0: off, one step per batch of
    # `batch_rows` rows.
    ppo_epochs: int = 1
    minibatches: int = 0
    # Rows: episodes cut into the windows the ContextPolicy generated them in, packed into rows of `seq_len`
    # tokens ("shared_prefix": one copy of a trajectory's prefix per row; "standard": every window alone),
    # `batch_rows` rows per forward pass.
    seq_len: int = 4096
    batch_rows: int = 1
    packing: str = "shared_prefix"
    max_concurrent_episodes: int = 8    # sandboxes (and sampler rows) live at once during the rollout
    # Tokens per logits chunk in the update's log-probs and entropies (training/loss.py chunked_token_logprobs):
    # each chunk's [B, loss_chunk, V] fp32 logits are made from the hidden states, reduced and dropped, and
    # recomputed in the backward pass, instead of [B, seq_len, V] at once (GLM's 151552-token vocabulary: 19.9 GB
    # per 32K-token row). The same numbers either way; 0: off (one pass over the whole row).
    loss_chunk: int = 0

    def __post_init__(self):
        def fail(field: str, why: str):
            raise ValueError(f"rl.{field}={getattr(self, field)!r} {why}")

        for name in ("steps", "tasks_per_step", "ppo_epochs", "seq_len", "batch_rows", "max_concurrent_episodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                fail(name, "must be an integer >= 1")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, numbers.Integral) \
                or self.group_size < 2:
            fail("group_size", "must be an integer >= 2 (an advantage is relative to the other episodes of its "
                               "group; one episode has no signal)")
        if isinstance(self.minibatches, bool) or not isinstance(self.minibatches, numbers.Integral) \
                or self.minibatches < 0:
            fail("minibatches", "must be an integer >= 0 (0: one optimizer step per batch of batch_rows rows)")
        if isinstance(self.loss_chunk, bool) or not isinstance(self.loss_chunk, numbers.Integral) \
                or self.loss_chunk < 0:
            fail("loss_chunk", "must be an integer >= 0 (tokens per logits chunk, e.g. 2048; 0: off, the whole "
                               "row's logits at once)")
        if self.advantage not in METHODS:
            fail("advantage", f"must be one of {METHODS}")
        if self.packing not in PACK_MODES:
            fail("packing", f"must be one of {PACK_MODES}")
        if not 0.0 <= self.eps_low < 1.0:
            fail("eps_low", "must be in [0, 1) (the ratio's lower clip is 1 - eps_low)")
        if not self.eps_high >= 0.0:
            fail("eps_high", "must be >= 0")
        if not self.kl_coef >= 0.0:
            fail("kl_coef", "must be >= 0 (0: off)")
        if not self.tis_cap >= 0.0:
            fail("tis_cap", "must be >= 0 (0: off; else the cap of the importance weight, e.g. 2.0)")
        for name in ("routing_replay", "replay_gap"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be true or false")

    @classmethod
    def from_mapping(cls, section: Mapping) -> RLConfig:
        """From a dict or ConfigDict (the config's `rl` section); unknown keys are an error naming them."""
        return cls(**known_items(dict(section.items()), cls, "rl"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
