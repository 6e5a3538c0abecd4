"""The compiled parts of generation, as pure functions of (graphdef, params state, decode state).

Layout (left padding): a batch of B prompts is left-padded to P slots, so every row's last prompt token
sits in slot P - 1 and generated token i of every row in slot P + i; one write index serves the whole
batch. Each row keeps its own RoPE positions (0 at its first real token) and a validity mask over the
S = P + N cache slots, so a row computes exactly what it would alone.

Decode state (a dict pytree, donated between calls):
  cache             the model's KV cache (Glm4MoeForCausalLM.init_cache layout), S slots
  kv_valid_BS       False at left-padding slots
  prompt_slots      P (int32 scalar); lengths_B: real prompt lengths (position of generated token 0)
  step              tokens sampled so far (the next column to fill)
  pending_B         the last sampled token, not yet fed to the model
  done_B, n_gen_B   finished rows; generated count per row (stop token included)
  tokens_BN, logprobs_BN, sampling_logprobs_BN   outputs; routed_LBNK (small int) or None
  temperature_B, top_k_B, top_p_B, seeds_B, stop_ids_BZ (-1 padded), max_new_B   per-row settings
Generated token i's routing is recorded when it is fed, i.e. in the step that samples token i + 1;
`feed_pending` feeds the last one after the loop.
"""
import collections

import jax
import jax.numpy as jnp
from flax import nnx

from klong_jax.sampling.logits import row_keys, sample_tokens

# Incremented while tracing: how many times each function was compiled for a new shape or setting.
TRACE_COUNTS: collections.Counter = collections.Counter()


def routing_dtype(n_experts: int):
    """The smallest integer type holding an expert id (the routing buffer is [L_moe, B, N, k])."""
    return jnp.uint8 if n_experts <= 256 else jnp.int16 if n_experts <= 32767 else jnp.int32


def _record(st: dict, logits_BV) -> dict:
    """Samples column `step` from logits_BV and advances the row states."""
    step, done_B = st["step"], st["done_B"]
    tokens_B, lp_B, slp_B = sample_tokens(logits_BV, row_keys(st["seeds_B"], step), st["temperature_B"],
                                          st["top_k_B"], st["top_p_B"])
    tokens_B = jnp.where(done_B, 0, tokens_B)

    def put(buf_BN, col_B):
        return jax.lax.dynamic_update_slice_in_dim(buf_BN, col_B[:, None].astype(buf_BN.dtype), step, axis=1)

    n_gen_B = st["n_gen_B"] + (~done_B).astype(jnp.int32)
    is_stop_B = jnp.any(st["stop_ids_BZ"] == tokens_B[:, None], axis=-1)
    return {**st,
            "tokens_BN": put(st["tokens_BN"], tokens_B),
            "logprobs_BN": put(st["logprobs_BN"], jnp.where(done_B, 0.0, lp_B)),
            "sampling_logprobs_BN": put(st["sampling_logprobs_BN"], jnp.where(done_B, 0.0, slp_B)),
            "n_gen_B": n_gen_B,
            "done_B": done_B | is_stop_B | (n_gen_B >= st["max_new_B"]),
            "pending_B": tokens_B,
            "step": step + 1}


def _feed(model, st: dict):
    """Feeds each row's pending token (column step - 1); returns (state, logits_BV of the next token)."""
    col = st["step"] - 1
    logits_BTV, cache, routed_LBTK = model.decode_step(
        st["pending_B"][:, None], st["cache"], positions_BT=(st["lengths_B"] + col)[:, None],
        write_index=st["prompt_slots"] + col, kv_valid_BS=st["kv_valid_BS"])
    st = {**st, "cache": cache}
    if st["routed_LBNK"] is not None:
        st["routed_LBNK"] = jax.lax.dynamic_update_slice_in_dim(
            st["routed_LBNK"], routed_LBTK.astype(st["routed_LBNK"].dtype), col, axis=2)
    return st, logits_BTV[:, 0]


def prefill(graphdef, params, batch: dict, *, cache_len: int, max_new: int, routing: bool,
            prompt_routing: bool):
    """Runs the left-padded prompts and samples generated token 0.

    batch: input_ids_BP, valid_BP (bool), positions_BP, lengths_B, active_B (False: batch padding),
    temperature_B, top_k_B, top_p_B, seeds_B, stop_ids_BZ, max_new_B.
    Returns (decode state with a cache of cache_len slots and N = max_new columns,
             prompt routing [L_moe, B, P, k] or None).
    """
    TRACE_COUNTS["prefill"] += 1
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    ids_BP, valid_BP = batch["input_ids_BP"], batch["valid_BP"]
    B, P = ids_BP.shape
    h_BPD, cache, routed_LBPK = model.prefill(ids_BP, cache_len=cache_len, positions_BT=batch["positions_BP"],
                                              doc_ids_BT=valid_BP.astype(jnp.int32))
    logits_BV = model.logits(h_BPD[:, -1:])[:, 0]
    has_moe = routed_LBPK is not None
    r_dtype = routing_dtype(cfg.n_routed_experts)
    st = {
        "cache": cache,
        "kv_valid_BS": jnp.concatenate([valid_BP, jnp.ones((B, cache_len - P), bool)], axis=1),
        "prompt_slots": jnp.int32(P),
        "lengths_B": batch["lengths_B"].astype(jnp.int32),
        "step": jnp.int32(0),
        "pending_B": jnp.zeros((B,), jnp.int32),
        "done_B": ~batch["active_B"],
        "n_gen_B": jnp.zeros((B,), jnp.int32),
        "tokens_BN": jnp.zeros((B, max_new), jnp.int32),
        "logprobs_BN": jnp.zeros((B, max_new), jnp.float32),
        "sampling_logprobs_BN": jnp.zeros((B, max_new), jnp.float32),
        "routed_LBNK": (jnp.zeros((cfg.num_moe_layers, B, max_new, cfg.num_experts_per_tok), r_dtype)
                        if routing and has_moe else None),
        **{k: batch[k] for k in ("temperature_B", "top_k_B", "top_p_B", "seeds_B", "stop_ids_BZ", "max_new_B")},
    }
    prompt_routed = routed_LBPK.astype(r_dtype) if prompt_routing and has_moe else None
    return _record(st, logits_BV), prompt_routed


def decode_chunk(graphdef, params, st: dict, stop_at):
    """Decodes until `step` reaches stop_at (<= N) or every row is done."""
    TRACE_COUNTS["decode_chunk"] += 1
    model = nnx.merge(graphdef, params)

    def cond(s):
        return (s["step"] < stop_at) & ~jnp.all(s["done_B"])

    def body(s):
        s, logits_BV = _feed(model, s)
        return _record(s, logits_BV)

    return jax.lax.while_loop(cond, body, st)


def feed_pending(graphdef, params, st: dict):
    """Feeds the last sampled tokens so their routing is recorded (the loop stops before feeding them)."""
    TRACE_COUNTS["feed_pending"] += 1
    st, _ = _feed(nnx.merge(graphdef, params), st)
    return st
