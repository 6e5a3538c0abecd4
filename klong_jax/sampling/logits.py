"""Choosing the next token from logits, per row: greedy, temperature, top-k, top-p.

Every setting is a per-row array, so one compiled step serves any mix of requests. The full-vocabulary
sort that top-k / top-p need runs only when some row uses them (lax.cond).
"""
import jax
import jax.numpy as jnp


def filter_top_k_top_p(scaled_BV, top_k_B, top_p_B):
    """Logits outside each row's top-k, then outside its top-p nucleus (of the top-k distribution),
    set to -inf. top_k 0 and top_p 1.0 keep everything. Ties at the cut-off value are all kept."""
    V = scaled_BV.shape[-1]
    sorted_BV = -jnp.sort(-scaled_BV, axis=-1)
    k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, V), V)
    in_top_k_BV = jnp.arange(V)[None, :] < k_B[:, None]
    probs_BV = jax.nn.softmax(jnp.where(in_top_k_BV, sorted_BV, -jnp.inf), axis=-1)
    # Keep a token while the mass ranked strictly above it is below top_p: the first always stays.
    mass_above_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = in_top_k_BV & (mass_above_BV < top_p_B[:, None])
    n_keep_B = jnp.maximum(keep_BV.sum(-1), 1)
    threshold_B = jnp.take_along_axis(sorted_BV, (n_keep_B - 1)[:, None], axis=-1)
    return jnp.where(scaled_BV >= threshold_B, scaled_BV, -jnp.inf)


def sample_tokens(logits_BV, keys_B, temperature_B, top_k_B, top_p_B, allowed_BV=None):
    """(tokens_B int32, logprobs_B, sampling_logprobs_B).

    allowed_BV: bool, the tokens each row may take (constrained decoding; None: all). Masked logits are -inf
    before temperature, top-k and top-p, and greedy rows take the argmax of the allowed tokens; every row needs
    at least one allowed token.
    logprobs: log-softmax of the raw logits at the chosen token (temperature 1, no filtering, no mask).
    sampling_logprobs: log-probability under the masked, filtered, tempered distribution sampled from; 0 for
    greedy rows (temperature 0).
    """
    logits_BV = logits_BV.astype(jnp.float32)
    raw_logprobs_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    if allowed_BV is not None:
        logits_BV = jnp.where(allowed_BV, logits_BV, -jnp.inf)
    greedy_B = temperature_B <= 0
    scaled_BV = logits_BV / jnp.where(greedy_B, 1.0, temperature_B)[:, None]
    needs_filter = jnp.any((top_k_B > 0) | (top_p_B < 1.0))
    filtered_BV = jax.lax.cond(needs_filter, filter_top_k_top_p, lambda s, k, p: s,
                               scaled_BV, top_k_B, top_p_B)
    sampled_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BV)
    tokens_B = jnp.where(greedy_B, jnp.argmax(logits_BV, axis=-1), sampled_B).astype(jnp.int32)
    logprobs_B = jnp.take_along_axis(raw_logprobs_BV, tokens_B[:, None], -1)[:, 0]
    sampling_lp_B = jnp.take_along_axis(jax.nn.log_softmax(filtered_BV, axis=-1), tokens_B[:, None], -1)[:, 0]
    return tokens_B, logprobs_B, jnp.where(greedy_B, 0.0, sampling_lp_B)


def row_keys(seeds_B, step):
    """Per-row keys for one step: independent of the batch the row is in."""
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(seeds_B)
