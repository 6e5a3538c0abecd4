"""Attention of a few new tokens against a KV cache, without writing them into a copy of the cache.

The keys are two parts of one softmax: the S cache slots (k_BSKD / v_BSKD, read as they are) under
mask_cache_BTS, and the T new tokens' own k/v (k_new_BTKD / v_new_BTKD) under mask_new_BTT. This equals
`reference_attention` over the cache with the new k/v written at their slots and the write slots taken
out of the cache part's mask (tests/test_cached_attention.py checks it by brute force), without the
copy of the cache that writing them in first costs. fp32 softmax; rows whose masks are both empty
return zeros, as `reference_attention`'s do.

Layout: the cache is [B, S, K, hd] (kv heads between the slot and the feature axis). A GQA einsum over
it makes XLA transpose (copy) the cache into [B, K, S, hd] first, which for a few queries costs more
than the attention itself. Here the cache is read in its own layout as [B, S, K * hd]: the scores are
one matmul [B, T * H, K * hd] x [B, S, K * hd]^T with the queries laid out block-diagonally over the K
kv heads (a query of kv head k in the k-th hd-block, zeros elsewhere), the values one matmul
[B, T * H, S] x [B, S, K * hd] of which the diagonal kv-head blocks are kept. Both do K times the
useful multiply-adds: negligible against reading the cache for T = 1 (decoding), but for long chunks
(T of tens and more) writing into a copy and `reference_attention` is faster (models/attention.py
picks by T).
"""
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _f32(x):
    return x if x.dtype == jnp.float32 else x.astype(jnp.float32)


def cached_attention(q_BTHD, k_BSKD, v_BSKD, k_new_BTKD, v_new_BTKD, mask_cache_BTS, mask_new_BTT, *,
                     sm_scale=None):
    """o_BTHD (in q's dtype): queries over the cache slots allowed by mask_cache_BTS ([B or 1, T, S]) and
    the new tokens allowed by mask_new_BTT ([B or 1, T, T]), as one softmax."""
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    assert H % K == 0, f"{H} query heads are not a multiple of {K} kv heads"
    assert k_new_BTKD.shape == (B, T, K, D), (k_new_BTKD.shape, (B, T, K, D))
    G = H // K
    scale = D ** -0.5 if sm_scale is None else sm_scale
    q = _f32(q_BTHD).reshape(B, T, K, G, D) * scale
    mc = jnp.broadcast_to(mask_cache_BTS, (B, T, S))[:, :, None, None, :]      # [B, T, 1, 1, S]
    mn = jnp.broadcast_to(mask_new_BTT, (B, T, T))[:, :, None, None, :]        # [B, T, 1, 1, T]

    # Scores [B, T, K, G, S] against the cache.
    eye_KK = jnp.eye(K, dtype=jnp.float32)
    q_bd = (q[:, :, :, :, None, :] * eye_KK[None, None, :, None, :, None]).reshape(B, T * H, K * D)
    s_c = jnp.einsum("bmc,bsc->bms", q_bd, _f32(k_BSKD).reshape(B, S, K * D)).reshape(B, T, K, G, S)
    s_n = jnp.einsum("btkgd,bukd->btkgu", q, _f32(k_new_BTKD))
    s_c = jnp.where(mc, s_c, MASK_VALUE)
    s_n = jnp.where(mn, s_n, MASK_VALUE)
    m = jnp.maximum(jnp.max(s_c, axis=-1, keepdims=True), jnp.max(s_n, axis=-1, keepdims=True))
    p_c = jnp.where(mc, jnp.exp(s_c - m), 0.0)
    p_n = jnp.where(mn, jnp.exp(s_n - m), 0.0)
    l = jnp.sum(p_c, axis=-1) + jnp.sum(p_n, axis=-1)                          # [B, T, K, G]

    o_all = jnp.einsum("bms,bsc->bmc", p_c.reshape(B, T * H, S), _f32(v_BSKD).reshape(B, S, K * D))
    idx = jnp.arange(K)
    o = jnp.moveaxis(o_all.reshape(B, T, K, G, K, D)[:, :, idx, :, idx, :], 0, 2)   # [B, T, K, G, D]
    o = o + jnp.einsum("btkgu,bukd->btkgd", p_n, _f32(v_new_BTKD))
    o = o / jnp.where(l == 0.0, 1.0, l)[..., None]
    return o.reshape(B, T, H, D).astype(q_BTHD.dtype)
