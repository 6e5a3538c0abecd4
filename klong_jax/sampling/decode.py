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

Persistent caches (sessions.py: a row's cache kept from call to call): `append_chunk` writes C new tokens
per row at slots [w, w + C) with explicit positions (decode_step, T = C); `start_decode` builds the decode
state of such a cache (write index w, no prefill); `gather_slots` moves each row's valid slots to the front.
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
                                          st["top_k_B"], st["top_p_B"], st.get("allowed_BV"))
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


def _initial_state(cfg, cache, kv_valid_BS, write_index, batch: dict, *, max_new: int, routing: bool) -> dict:
    """The decode state before generated token 0 is sampled; generated token i goes to slot write_index + i."""
    B = kv_valid_BS.shape[0]
    return {
        "cache": cache,
        "kv_valid_BS": kv_valid_BS,
        "prompt_slots": jnp.asarray(write_index, jnp.int32),
        "lengths_B": batch["lengths_B"].astype(jnp.int32),
        "step": jnp.int32(0),
        "pending_B": jnp.zeros((B,), jnp.int32),
        "done_B": ~batch["active_B"],
        "n_gen_B": jnp.zeros((B,), jnp.int32),
        "tokens_BN": jnp.zeros((B, max_new), jnp.int32),
        "logprobs_BN": jnp.zeros((B, max_new), jnp.float32),
        "sampling_logprobs_BN": jnp.zeros((B, max_new), jnp.float32),
        "routed_LBNK": (jnp.zeros((cfg.num_moe_layers, B, max_new, cfg.num_experts_per_tok),
                                  routing_dtype(cfg.n_routed_experts))
                        if routing and cfg.num_moe_layers else None),
        **{k: batch[k] for k in ("temperature_B", "top_k_B", "top_p_B", "seeds_B", "stop_ids_BZ", "max_new_B")},
        # The tokens each row may sample next (constrained decoding; the host refreshes it every step), or None.
        "allowed_BV": batch.get("allowed_BV"),
    }


def prefill(graphdef, params, batch: dict, *, cache_len: int, max_new: int, routing: bool,
            prompt_routing: bool):
    """Runs the left-padded prompts and samples generated token 0.

    batch: input_ids_BP, valid_BP (bool), positions_BP, lengths_B, active_B (False: batch padding),
    temperature_B, top_k_B, top_p_B, seeds_B, stop_ids_BZ, max_new_B, and allowed_BV (bool) when some row
    is constrained (the mask of generated token 0).
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
    kv_valid_BS = jnp.concatenate([valid_BP, jnp.ones((B, cache_len - P), bool)], axis=1)
    st = _initial_state(cfg, cache, kv_valid_BS, P, batch, max_new=max_new,
                        routing=routing and routed_LBPK is not None)
    prompt_routed = (routed_LBPK.astype(routing_dtype(cfg.n_routed_experts))
                     if prompt_routing and routed_LBPK is not None else None)
    return _record(st, logits_BV), prompt_routed


def append_chunk(graphdef, params, cache, chunk: dict, write_index):
    """Writes one chunk of C new tokens per row into a persistent cache at slots [write_index, write_index + C).

    chunk: input_ids_BC, positions_BC (each token's RoPE position: its index in its row's context),
    kv_valid_BS (the row's valid slots once this chunk is written: cached tokens kept plus every new token
    of this and later chunks; later slots are hidden by the causal slot order anyway). A query at slot s
    attends the valid slots <= s; a padding column (not valid) with no valid slot before it gets a zero
    attention output (kernels.reference_attention), so its k/v stay finite and it is never marked valid.
    Returns (cache, logits_BV of the chunk's last column, routed experts [L_moe, B, C, k] or None).
    """
    TRACE_COUNTS["append_chunk"] += 1
    model = nnx.merge(graphdef, params)
    logits_BCV, cache, routed_LBCK = model.decode_step(
        chunk["input_ids_BC"], cache, positions_BT=chunk["positions_BC"], write_index=write_index,
        kv_valid_BS=chunk["kv_valid_BS"])
    if routed_LBCK is not None:
        routed_LBCK = routed_LBCK.astype(routing_dtype(model.cfg.n_routed_experts))
    return cache, logits_BCV[:, -1], routed_LBCK


def start_decode(graphdef, params, cache, logits_BV, batch: dict, write_index, *, max_new: int, routing: bool):
    """The decode state of a persistent cache whose prompts end just below slot write_index, with generated
    token 0 sampled from logits_BV (the last prompt token's logits).

    batch: kv_valid_BS (valid slots below write_index), lengths_B (prompt lengths: the RoPE position of
    generated token 0), active_B and the per-row settings of `prefill`. Slots >= write_index are marked
    valid: generated token i is written at write_index + i before any query reads it (causal slot order).
    """
    TRACE_COUNTS["start_decode"] += 1
    cfg = nnx.merge(graphdef, params).cfg
    S = batch["kv_valid_BS"].shape[1]
    kv_valid_BS = batch["kv_valid_BS"] | (jnp.arange(S, dtype=jnp.int32) >= write_index)[None, :]
    st = _initial_state(cfg, cache, kv_valid_BS, write_index, batch, max_new=max_new, routing=routing)
    return _record(st, logits_BV)


def gather_slots(cache, src_BS):
    """Compaction: slot j of row b takes the k/v of slot src_BS[b, j] (a pure copy: exact)."""
    TRACE_COUNTS["gather_slots"] += 1
    return jax.tree.map(lambda a: jnp.take_along_axis(a, src_BS[None, :, :, None, None], axis=2), cache)


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
