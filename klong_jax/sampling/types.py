"""What a request asks for (SamplingParams) and what it gets back (Completion)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from klong_jax.sampling.constraint import TokenConstraint

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings; requests with different settings share one batch.

    temperature: 0 means greedy (argmax). top_k: 0 disables it. top_p: 1.0 disables it.
    Filters apply in the order temperature -> top-k -> top-p (ties at a cut-off are all kept).
    stop_token_ids: stop tokens in addition to the sampler's defaults (its `default_stop_token_ids`),
    which are left out when use_default_stop_tokens is False. A stop token is part of `tokens`.
    stop_strings: generation ends once the decoded text contains one; checked on the host between
    decode chunks, so a few tokens past it may be computed and are then dropped.
    seed: the row's random stream (same seed and prompt -> same sample); None draws one.
    return_routing / return_prompt_routing: routed expert ids of generated / prompt tokens.
    constraint: a TokenConstraint (constraint.py, e.g. a JsonConstraint) that masks every generated token to
    those it allows (None: unconstrained). A constrained batch decodes one token per device call.
    """
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    use_default_stop_tokens: bool = True
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    return_routing: bool = False
    return_prompt_routing: bool = False
    constraint: object | None = None

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens={self.max_new_tokens!r}: must be an int >= 1")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature={self.temperature!r}: must be >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k={self.top_k!r}: must be an int >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p={self.top_p!r}: must be in (0, 1]")
        if isinstance(self.stop_strings, str) or any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"SamplingParams.stop_strings={self.stop_strings!r}: must be non-empty strings")
        if self.constraint is not None and not isinstance(self.constraint, TokenConstraint):
            raise ValueError(f"SamplingParams.constraint={self.constraint!r}: must have start(), allowed(state) "
                             "and advance(state, token) (klong_jax.sampling.constraint.TokenConstraint)")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def replace(self, **kw) -> SamplingParams:
        return dataclasses.replace(self, **kw)


@dataclass
class Completion:
    """One generated sequence.

    tokens: the generated ids (a stop token that ended it included; for a stop string, up to and
      including the token that completed it).
    logprobs: [T] float32, log p(token | context) under the model's UNMODIFIED distribution
      (temperature 1, no top-k / top-p): what RL's importance ratios need.
    sampling_logprobs: [T] float32, log-probability under the distribution actually sampled from
      (temperature, top-k and top-p applied); 0 for greedy rows (a point mass).
    routed_experts: [L_moe, T, k] int32 expert ids each generated token was routed to when it was fed to
      the model (routing replay), or None when not asked for (or the model has no MoE layer).
    prompt_routed_experts: [L_moe, P, k] int32 for the prompt tokens, or None.
    finish_reason: "stop" (stop token or stop string) or "length" (max_new_tokens reached).
    stop: the stop token id or stop string that ended it (None for "length").
    text: the decoded tokens without the stop token / stop string (None without a tokenizer).
    """
    tokens: list[int]
    logprobs: np.ndarray
    sampling_logprobs: np.ndarray
    finish_reason: str
    routed_experts: np.ndarray | None = None
    prompt_routed_experts: np.ndarray | None = None
    stop: int | str | None = None
    text: str | None = None
    prompt_len: int = 0
