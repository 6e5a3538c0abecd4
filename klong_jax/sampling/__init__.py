"""Batched generation with a KV cache (Sampler) and its compiled building blocks.

High level: `Sampler(model, tokenizer, mesh=None).generate(prompt_token_lists, SamplingParams(...))`
-> list[Completion(tokens, logprobs, routed_experts, finish_reason, ...)]; `Sampler.update_params`;
multi-turn sessions `generate(..., session_ids=[...])` / `Sampler.end_session` (KV cache kept between calls,
only new tokens prefilled: sessions.py); constrained decoding `SamplingParams(constraint=JsonConstraint(
compile_schema(schema), TokenVocab.from_tokenizer(tokenizer, V), stop_ids))` (json_schema.py, constraint.py).
Low level (pure functions of graphdef, params state and a decode-state dict; jit them yourself or use
the Sampler's `prefill_fn` / `decode_fn` / `feed_fn`): `prefill`, `decode_chunk`, `feed_pending`,
`sample_tokens`, `filter_top_k_top_p`; for persistent caches `append_chunk`, `start_decode`, `gather_slots`.
"""
from klong_jax.sampling.buckets import batch_bucket, length_bucket
from klong_jax.sampling.constraint import JsonConstraint, TokenConstraint, TokenVocab
from klong_jax.sampling.decode import (TRACE_COUNTS, append_chunk, decode_chunk, feed_pending, gather_slots, prefill,
                                       start_decode)
from klong_jax.sampling.json_schema import SchemaError, compile_schema
from klong_jax.sampling.logits import filter_top_k_top_p, sample_tokens
from klong_jax.sampling.sampler import Sampler
from klong_jax.sampling.sessions import SessionCache
from klong_jax.sampling.types import Completion, SamplingParams

__all__ = ["Completion", "JsonConstraint", "Sampler", "SamplingParams", "SchemaError", "SessionCache", "TRACE_COUNTS",
           "TokenConstraint", "TokenVocab", "append_chunk", "batch_bucket", "compile_schema",
           "decode_chunk", "feed_pending", "filter_top_k_top_p", "gather_slots", "length_bucket", "prefill",
           "sample_tokens", "start_decode"]
