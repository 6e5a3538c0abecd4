"""The agent's knobs: budgets that end an episode, sampling, and the messages it adds to the context.

Every number here is this project's design (klong_method.md): a config value, never a constant. RL
stages raise `timeout_s`, `max_turns` and `max_total_tokens` from stage to stage.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from klong_jax.config_mapping import known_items
from klong_jax.data.context import ContextConfig


@dataclass(frozen=True)
class AgentConfig:
    context: ContextConfig                  # the ContextPolicy's budget (the same one SFT splits with)
    timeout_s: float = 3600.0               # wall-clock seconds of one episode (model time included)
    max_turns: int = 200                    # assistant turns of one episode
    max_total_tokens: int = 200_000         # tokens the model may generate in one episode
    max_new_tokens_per_turn: int | None = None   # cap on one assistant message (None: the context's)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                          # 0: no top-k filtering
    reminder_every: int = 10                # tell the elapsed time every N turns (0: never)
    grade_timeout_s: float = 30.0           # per rubric check
    command_timeout_s: float | None = None  # per tool command (None: the sandbox pool's limit)
    disk_mib: int = 0                       # space of the episode directory (0: the sandbox pool's limit)
    # End each turn after its first complete tool call (what the system prompt asks for): the tokens sampled after
    # it are dropped as a stop string's would be, and the turn's end-of-turn token is appended. Templates whose
    # calls end in text (ChatML's `</tool_call>`, `ChatTemplate.call_end_text`); False: the turn runs every call.
    one_call_per_turn: bool = False
    # False: a submit call does not end the episode; the time or turn budget does (PaperBench's IterativeAgent, which
    # takes the early exit away). For progressive RL's short stages: there an episode cut by the budget and one that
    # submits earn the same grade, so nothing in the stage's reward holds back submitting early, a habit that costs
    # score at the final budget. The call is answered with `submit_refused_message` and uses up its turn.
    submit_ends_episode: bool = True
    submit_refused_message: str = ("Not submitted: this task ends at its time limit, not at submit. Use the time "
                                   "left to check and improve your work.")
    nudge_message: str = ("You did not call a tool. Each turn, call exactly one tool; call submit "
                          "when the project is done.")

    def __post_init__(self):
        if not isinstance(self.context, ContextConfig):
            raise TypeError(f"agent.context must be a ContextConfig, got {type(self.context).__name__}")
        if not self.timeout_s > 0:
            raise ValueError(f"agent.timeout_s={self.timeout_s} must be > 0")
        for name in ("max_turns", "max_total_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"agent.{name}={getattr(self, name)} must be >= 1")
        if self.max_new_tokens_per_turn is not None and self.max_new_tokens_per_turn < 1:
            raise ValueError("agent.max_new_tokens_per_turn must be >= 1 or None")
        if self.temperature < 0:
            raise ValueError(f"agent.temperature={self.temperature} must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"agent.top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0 or self.reminder_every < 0:
            raise ValueError("agent.top_k and agent.reminder_every must be >= 0")
        if not self.grade_timeout_s > 0:
            raise ValueError(f"agent.grade_timeout_s={self.grade_timeout_s} must be > 0")
        if self.command_timeout_s is not None and not self.command_timeout_s > 0:
            raise ValueError("agent.command_timeout_s must be > 0 or None")
        for name in ("one_call_per_turn", "submit_ends_episode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"agent.{name}={getattr(self, name)!r} must be true or false")
        if self.disk_mib < 0:
            raise ValueError(f"agent.disk_mib={self.disk_mib} must be >= 0 (0: the sandbox pool's limit)")

    @classmethod
    def from_mapping(cls, section: Mapping, context: Mapping | ContextConfig | None = None
                     ) -> AgentConfig:
        """From a dict or ConfigDict (`context` inside it or given apart); unknown keys are an error."""
        items = dict(section.items())
        ctx = items.pop("context", None) if context is None else context
        if ctx is None:
            raise ValueError("agent config: no context section (budget_tokens, reserve_tokens, ...)")
        if not isinstance(ctx, ContextConfig):
            ctx = ContextConfig.from_mapping(ctx)
        return cls(context=ctx, **known_items(items, cls, "agent", exclude=("context",)))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["context"] = dataclasses.asdict(self.context)
        return out


ROLLOUT_DTYPES = ("", "float32", "bfloat16")


@dataclass(frozen=True)
class RolloutConfig:
    """Where and how the rollout sampler holds the policy (config.rollout; RL rollouts and evaluation alike).

    The sampler keeps its own copy of the weights (the trainer's are donated each step), so it need not share the
    trainer's devices or dtype, as in verl's and Tunix's rollout engines: its copy may be cast (bfloat16 halves
    the bytes every decode step reads) and placed on fewer devices (on a CPU, decoding a small model on one
    emulated device of two is 1.7x faster than sharding it over both: no gather of every weight per step).
    The trainer recomputes every log-probability it trains on in its own dtype; the sampler's, in another dtype,
    only enter through the truncated importance weight (rl.tis_cap), which is there for this mismatch."""
    devices: int = 0            # N devices of the process from first_device on (0: all of them: the trainer's mesh,
    #                             or rollout.mesh over every device when that is given)
    # The sampler's devices are jax.devices()[first_device:first_device + devices] (devices > 0 only): e.g. 4 and 4
    # on 8 devices puts the sampler on devices 4-7, beside a trainer on 0-3 (the weight sync then copies across).
    first_device: int = 0
    mesh: tuple = ()            # axis sizes over those devices, e.g. (("tensor", 4),) (empty: fsdp over all)
    dtype: str = ""             # params and compute of the sampler's copy ("": the model's own dtypes)
    session_chunk: int = 128    # C: tokens per row of one prefill call of a session (klong_jax/sampling/sessions.py)

    def __post_init__(self):
        if self.devices < 0:
            raise ValueError(f"rollout.devices={self.devices} must be >= 0 (0: every device)")
        if self.first_device < 0 or (self.first_device and not self.devices):
            raise ValueError(f"rollout.first_device={self.first_device}: must be >= 0, and > 0 only with "
                             f"rollout.devices > 0 (devices={self.devices}; 0 means every device)")
        if self.dtype not in ROLLOUT_DTYPES:
            raise ValueError(f"rollout.dtype={self.dtype!r} must be one of {ROLLOUT_DTYPES} ('': the model's)")
        if self.session_chunk < 1:
            raise ValueError(f"rollout.session_chunk={self.session_chunk} must be >= 1 (e.g. 128)")

    def device_slice(self, devices: list, where: str = "this process") -> list:
        """The sampler's devices among `devices` (in their order): `devices` of them from `first_device` on (0: all
        from first_device on); ValueError naming the fields when they do not fit."""
        first = self.first_device
        n = self.devices or len(devices) - first
        if first + n > len(devices):
            raise ValueError(f"rollout.devices={n}: {where} has {len(devices)} devices (0: all of them); from "
                             f"rollout.first_device={first} on it needs {first + n}: lower either")
        return list(devices)[first:first + n]

    @classmethod
    def from_mapping(cls, section: Mapping | None) -> RolloutConfig:
        """From a dict or ConfigDict (None or empty: the defaults); unknown keys are an error."""
        items = known_items(dict(section or {}), cls, "rollout")
        mesh = items.pop("mesh", ())
        # A dict or a ConfigDict (not a Mapping: `--config.rollout.mesh` overrides give one) of axis sizes, or pairs.
        mesh = tuple(sorted((str(k), int(v)) for k, v in (mesh.items() if hasattr(mesh, "items") else mesh)))
        return cls(mesh=mesh, **items)
