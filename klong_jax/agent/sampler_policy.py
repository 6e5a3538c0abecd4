"""SamplerPolicy: the agent's Policy on the KV-cache sampler (`klong_jax.sampling.Sampler`).

Each request gets its own SamplingParams: its episode's token limit, the template's end-of-turn
tokens as the only stop tokens (the model config's eos ids are not turn ends), and a seed derived
from (seed, episode id, turn), so a rollout is reproducible whatever batch its turns share.
`update_params` swaps the RL trainer's current weights in (and drops every cached context).

reuse_cache (default): each episode is a sampler session (klong_jax/sampling/sessions.py) keyed by its
episode id, so a turn prefills only what its prompt adds to the previous turn's context (tool results,
template tokens, the next assistant header), from the first token that differs; `end_episode` (called by
run_episodes when an episode ends) frees its row. Outputs equal those without reuse (up to float rounding).
`stats`: the sampler's counters (prompt_tokens, prefill_tokens, reused_tokens, compactions, ...).

rollout (config.rollout, `RolloutConfig`): the sampler's own copy of the weights may be cast and placed on a mesh
over N devices (`rollout_model`: the first N, or from
rollout.first_device on); `update_params` casts and moves each update the same way.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from klong_jax.agent.config import AgentConfig, RolloutConfig
from klong_jax.agent.policy import GenerationParams, TurnRequest
from klong_jax.models.init import abstract_model
from klong_jax.sampling import Sampler, SamplingParams
from klong_jax.sharding import make_mesh


def rollout_model(model, mesh, rollout: RolloutConfig | None):
    """(model, mesh) the sampler is built from: `model` cast to rollout.dtype (params and compute: a model of the
    same architecture whose floating-point variables are cast copies) and `mesh` replaced by a mesh of
    rollout.mesh's axes over the rollout.devices devices from rollout.first_device on (default: the first ones).
    None or the defaults: (model, mesh) unchanged."""
    if rollout is None:
        return model, mesh
    if rollout.dtype and (model.cfg.param_dtype != rollout.dtype or model.cfg.compute_dtype != rollout.dtype):
        cfg = model.cfg.replace(param_dtype=rollout.dtype, compute_dtype=rollout.dtype)
        graphdef = nnx.split(abstract_model(cfg))[0]
        dtype = jnp.dtype(rollout.dtype)
        state = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                             nnx.state(model))
        model = nnx.merge(graphdef, state)
    if rollout.devices or rollout.mesh:     # a mesh of rollout.mesh's axes (devices 0: over every device)
        mesh = make_mesh(dict(rollout.mesh) or {"fsdp": -1}, rollout.device_slice(jax.devices()))
    return model, mesh


class SamplerPolicy:
    def __init__(self, sampler: Sampler, *, seed: int | None = 0, reuse_cache: bool = True):
        """seed: None draws every request's stream from the sampler's own generator.
        reuse_cache: keep each episode's KV cache between its turns (requests must then name episodes)."""
        self.sampler = sampler
        self.seed = seed
        self.reuse_cache = reuse_cache

    @classmethod
    def from_model(cls, model, mesh=None, *, seed: int | None = 0, reuse_cache: bool = True, tokenizer=None,
                   rollout: RolloutConfig | None = None, **sampler_kwargs) -> SamplerPolicy:
        """tokenizer: only needed for stop strings (agent.one_call_per_turn; `rollout_buckets` passes it then).
        Otherwise the sampler gets none: the agent parses ids itself, and a model vocabulary padded past the
        tokenizer's would make the sampler's text decoding fail.
        rollout: the sampler's dtype, devices and session chunk (`rollout_model`); None: the model's, on mesh."""
        model, mesh = rollout_model(model, mesh, rollout)
        if rollout is not None:
            sampler_kwargs.setdefault("session_chunk", rollout.session_chunk)
        return cls(Sampler(model, tokenizer, mesh, **sampler_kwargs), seed=seed, reuse_cache=reuse_cache)

    @property
    def stats(self):
        """The sampler's counters: prompt_tokens asked, prefill_tokens run, reused_tokens kept, ..."""
        return self.sampler.stats

    def end_episode(self, episode_id: str) -> None:
        """The episode has ended: its cached context is dropped and its row freed."""
        self.sampler.end_session(episode_id)

    @staticmethod
    def rollout_buckets(config: AgentConfig, max_concurrent: int, template=None) -> dict:
        """Sampler shape floors that give a whole rollout one compilation per sampler function.

        Left to itself the sampler buckets each call by its batch, prompt and new-token lengths; in a
        rollout those change every turn (episodes finish, contexts grow), and each new bucket is a new
        compilation (seconds to minutes each, more than the tiny model's whole rollout on a CPU). The
        ContextPolicy bounds every prompt by the budget and every turn by the per-turn cap, so padding
        to those and to the pool's concurrency costs a fixed amount of compute and compiles once."""
        per_turn = config.max_new_tokens_per_turn or config.context.budget_tokens
        kwargs = {"min_batch": max_concurrent, "min_prompt_bucket": config.context.budget_tokens,
                  "min_new_bucket": min(per_turn, config.context.budget_tokens)}
        if config.one_call_per_turn:
            if template is None:
                raise ValueError("rollout_buckets: agent.one_call_per_turn needs the template (its tokenizer finds "
                                 "the end of the first call between decode chunks)")
            # The call's end is a stop string, checked every decode_chunk steps: a turn stops within 16 tokens of it.
            kwargs.update(tokenizer=template.tokenizer, decode_chunk=16)
        return kwargs

    def update_params(self, params, **kwargs) -> None:
        self.sampler.update_params(params, **kwargs)

    def request_seed(self, request: TurnRequest) -> int | None:
        if self.seed is None:
            return None
        return zlib.crc32(f"{self.seed}/{request.episode_id}/{request.turn}".encode()) & 0x7FFFFFFF

    def generate(self, prompts: Sequence[Sequence[int]], params: GenerationParams, *,
                 requests: Sequence[TurnRequest] | None = None) -> list:
        if requests is not None and len(requests) != len(prompts):
            raise ValueError(f"{len(requests)} requests for {len(prompts)} prompts")
        per_row = []
        for i in range(len(prompts)):
            request = requests[i] if requests is not None else None
            per_row.append(SamplingParams(
                max_new_tokens=int(request.max_new_tokens if request else params.max_new_tokens),
                temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                stop_token_ids=tuple(params.stop_token_ids), use_default_stop_tokens=False,
                seed=self.request_seed(request) if request else None,
                stop_strings=tuple(params.stop_strings),
                return_routing=params.return_routing,
                return_prompt_routing=params.return_prompt_routing))
        if self.reuse_cache and requests is not None:
            return self.sampler.generate(prompts, per_row, session_ids=[r.episode_id for r in requests])
        return self.sampler.generate(prompts, per_row)
