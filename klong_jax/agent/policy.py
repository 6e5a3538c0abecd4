"""What the agent needs from a model: one batched call that continues token prompts.

    completions = policy.generate(prompts, params, requests=requests)

`prompts[i]` is the exact context of one episode's next turn (prefix + kept turns + generation prompt);
`requests[i]` says whose turn it is (episode, task, turn index, its own token limit) and carries the same
context as messages (`messages`: the prefix and the kept turns, tool results truncated as in the prompt): a
sampler ignores it, the scripted policy replays by it, a chat-API policy (`klong_jax.agent.chat_policy`)
sends its messages. A completion holds the sampled ids (the end-of-turn
token included when sampling stopped on it), optionally their log-probs `[n]` (under the model's
unmodified distribution, and under the tempered/filtered one sampled from), the routed experts of the
MoE layers for the generated tokens `[L_moe, n, k]` (each as it was fed to the model) and for the
prompt `[L_moe, P, k]`, and why it stopped ("stop" or "length"). These are the field names of
`klong_jax.sampling.Completion`, so a sampler's completions pass through unchanged. A completion whose
`error` is set is no turn: the policy could not produce one (a chat endpoint that failed after its retries),
and the episode ends with finish_reason "error" and that message; the other episodes of the batch go on.

Optional, used by `run_episodes` when present: `end_episode(episode_id)` (the episode has ended: a policy
that caches its context frees it) and `stats` (a mapping with `prefill_tokens` and `reused_tokens`
counters, read before and after each generate and added to the rollout's timings).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from klong_jax.data.trajectory import Message

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int                 # the largest limit of the batch; each request has its own
    stop_token_ids: tuple[int, ...]     # the template's end-of-turn tokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    return_routing: bool = False
    return_prompt_routing: bool = False
    stop_strings: tuple[str, ...] = ()   # texts that end a turn (agent.one_call_per_turn: the call's end)


@dataclass(frozen=True)
class TurnRequest:
    episode_id: str
    task_id: str
    turn: int
    max_new_tokens: int
    # The prompt as messages (ContextPolicy.context_messages: prefix + kept turns, tool results truncated);
    # AgentEpisode fills it, None when a caller builds requests without it.
    messages: tuple[Message, ...] | None = None


@dataclass
class Completion:
    tokens: list[int]
    logprobs: np.ndarray | None = None              # float32 [n], temperature 1, unfiltered
    sampling_logprobs: np.ndarray | None = None     # float32 [n], what was sampled from
    routed_experts: np.ndarray | None = None        # int32 [L_moe, n, k]
    prompt_routed_experts: np.ndarray | None = None  # int32 [L_moe, P, k]
    finish_reason: str = "stop"
    error: str | None = None    # set: no turn was produced (the episode ends as an error with this message)


class Policy(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], params: GenerationParams, *,
                 requests: Sequence[TurnRequest] | None = None) -> list[Any]:
        """One completion (with the fields of `Completion`) per prompt, in order."""


def clip_completion(completion: Any, limit: int, stop_ids: Sequence[int]) -> Completion:
    """The completion as if sampled with `limit` new tokens and these stop tokens: cut after the
    first stop token or at `limit` (sampling is autoregressive, so a prefix of a longer sample is a
    sample under the shorter limit). Log-probs and routed experts are cut alike."""
    tokens = [int(t) for t in completion.tokens]
    stops = set(int(s) for s in stop_ids)
    end = next((i + 1 for i, t in enumerate(tokens) if t in stops), None)
    if end is not None and end <= limit:
        n, reason = end, "stop"
    elif len(tokens) > limit:
        n, reason = limit, "length"
    else:
        n = len(tokens)
        reason = "length" if completion.finish_reason == "stop" and end is None else \
            completion.finish_reason
    if reason not in FINISH_REASONS:
        raise ValueError(f"completion finish_reason={completion.finish_reason!r}; "
                         f"expected one of {FINISH_REASONS}")
    logprobs = _per_token(getattr(completion, "logprobs", None), len(tokens), n, "log-probs")
    sampling = _per_token(getattr(completion, "sampling_logprobs", None), len(tokens), n,
                          "sampling log-probs")
    routed = getattr(completion, "routed_experts", None)
    if routed is not None:
        routed = np.asarray(routed, np.int32)
        if routed.ndim != 3 or routed.shape[1] != len(tokens):
            raise ValueError(f"completion has {len(tokens)} tokens but routed experts of shape "
                             f"{routed.shape} (expected [L_moe, {len(tokens)}, k])")
        routed = routed[:, :n]
    prompt_routed = getattr(completion, "prompt_routed_experts", None)
    if prompt_routed is not None:
        prompt_routed = np.asarray(prompt_routed, np.int32)
    return Completion(tokens[:n], logprobs, sampling, routed, prompt_routed, reason)


def _per_token(values, n_tokens: int, n: int, what: str) -> np.ndarray | None:
    if values is None:
        return None
    values = np.asarray(values, np.float32)
    if values.shape != (n_tokens,):
        raise ValueError(f"completion has {n_tokens} tokens but {what} of shape {values.shape}")
    return values[:n]
