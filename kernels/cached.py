"""Attention of a few new tokens against a KV cache, without writing them into a copy of the cache.

The keys are two parts of one softmax: the S cache slots (k_BSKH / v_BSKH, read as they are) under
mask_cache_BTS, and the T new tokens' own k/v (k_new_BTKH / v_new_BTKH) under mask_new_BTT. This equals
`reference_attention` over the cache with the new k/v written at their slots and the write slots taken
out of the cache part's mask (tests/test_cached_attention.py checks it by brute force), without the
copy of the cache that writing them in first costs. fp32 softmax; rows whose masks are both empty
return zeros, as `reference_attention`'s do.

Layout: the cache is [B, S, K, H] (kv heads between the slot and the feature axis). A GQA einsum over
it makes XLA transpose (copy) the cache into [B, K, S, H] first, which for a few queries costs more
than the attention itself. Here the cache is read in its own layout as [B, S, Z] (Z = K * H): the scores
are one matmul [B, Q, Z] x [B, S, Z]^T (Q = T * N query rows) with the queries laid out block-diagonally
over the K kv heads (a query of kv head k in the k-th H-block, zeros elsewhere), the values one matmul
[B, Q, S] x [B, S, Z] of which the diagonal kv-head blocks are kept. Both do K times the
useful multiply-adds: negligible against reading the cache for T = 1 (decoding), but for long chunks
(T of tens and more) writing into a copy and `reference_attention` is faster (models/attention.py
picks by T).

Shape letters (klong_jax/models/__init__.py): N query heads, K kv heads, G = N / K, H head dim, U the new
tokens as keys, Q = T * N and Z = K * H the flattened matmul axes.
"""
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _f32(x):
    return x if x.dtype == jnp.float32 else x.astype(jnp.float32)


def cached_attention(q_BTNH, k_BSKH, v_BSKH, k_new_BTKH, v_new_BTKH, mask_cache_BTS, mask_new_BTT, *,
                     sm_scale=None):
    """o_BTNH (in q's dtype): queries over the cache slots allowed by mask_cache_BTS ([B or 1, T, S]) and
    the new tokens allowed by mask_new_BTT ([B or 1, T, T]), as one softmax."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    assert N % K == 0, f"{N} query heads are not a multiple of {K} kv heads"
    assert k_new_BTKH.shape == (B, T, K, H), (k_new_BTKH.shape, (B, T, K, H))
    G = N // K
    scale = H ** -0.5 if sm_scale is None else sm_scale
    q = _f32(q_BTNH).reshape(B, T, K, G, H) * scale                            # [B, T, K, G, H]
    mc = jnp.broadcast_to(mask_cache_BTS, (B, T, S))[:, :, None, None, :]      # [B, T, 1, 1, S]
    mn = jnp.broadcast_to(mask_new_BTT, (B, T, T))[:, :, None, None, :]        # [B, T, 1, 1, U]

    # Scores [B, T, K, G, S] against the cache, [B, T, K, G, U] against the new tokens.
    eye_KK = jnp.eye(K, dtype=jnp.float32)
    q_bd = (q[:, :, :, :, None, :] * eye_KK[None, None, :, None, :, None]).reshape(B, T * N, K * H)  # [B, Q, Z]
    s_c = jnp.einsum("BQZ,BSZ->BQS", q_bd, _f32(k_BSKH).reshape(B, S, K * H)).reshape(B, T, K, G, S)
    s_n = jnp.einsum("BTKGH,BUKH->BTKGU", q, _f32(k_new_BTKH))
    s_c = jnp.where(mc, s_c, MASK_VALUE)
    s_n = jnp.where(mn, s_n, MASK_VALUE)
    m = jnp.maximum(jnp.max(s_c, axis=-1, keepdims=True), jnp.max(s_n, axis=-1, keepdims=True))
    p_c = jnp.where(mc, jnp.exp(s_c - m), 0.0)
    p_n = jnp.where(mn, jnp.exp(s_n - m), 0.0)
    l = jnp.sum(p_c, axis=-1) + jnp.sum(p_n, axis=-1)                          # [B, T, K, G]

    o_all = jnp.einsum("BQS,BSZ->BQZ", p_c.reshape(B, T * N, S), _f32(v_BSKH).reshape(B, S, K * H))
    idx = jnp.arange(K)
    o = jnp.moveaxis(o_all.reshape(B, T, K, G, K, H)[:, :, idx, :, idx, :], 0, 2)   # [B, T, K, G, H]
    o = o + jnp.einsum("BTKGU,BUKH->BTKGH", p_n, _f32(v_new_BTKH))
    o = o / jnp.where(l == 0.0, 1.0, l)[..., None]
    return o.reshape(B, T, N, H).astype(q_BTNH.dtype)
