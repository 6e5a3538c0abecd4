"""Plain-JAX reference attention with an explicit mask: the oracle every kernel is tested against.

Mask semantics (see klong_method.md, shared-prefix packing): query q may attend to key k iff
  doc[q] == doc[k] != 0, k <= q in packed order (when causal), and (win[k] == 0 or win[k] == win[q]).
doc_ids=None means one document; window_ids=None means no prefix sharing.
Shape letters (klong_jax/models/__init__.py): N query heads, K kv heads, G = N / K, H head dim.
"""
import jax
import jax.numpy as jnp

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(doc_ids_BT, window_ids_BT, T: int, S: int, *, causal: bool = True,
                   q_positions_BT=None, k_positions_BS=None, kv_doc_ids_BS=None,
                   kv_window_ids_BS=None):
    """Boolean mask [B, T, S]; True where query t may attend to key s.

    Self-attention by default (T == S, keys share the queries' ids). For decoding against a cache,
    pass the key-side ids and packed-order positions of queries and keys.
    """
    q_pos = q_positions_BT if q_positions_BT is not None else jnp.arange(T)[None, :]
    k_pos = k_positions_BS if k_positions_BS is not None else jnp.arange(S)[None, :]
    mask = jnp.ones((1, T, S), dtype=bool)
    if causal:
        mask = mask & (k_pos[:, None, :] <= q_pos[:, :, None])
    if doc_ids_BT is not None:
        kdoc = kv_doc_ids_BS if kv_doc_ids_BS is not None else doc_ids_BT
        mask = mask & (doc_ids_BT[:, :, None] == kdoc[:, None, :]) & (kdoc[:, None, :] != 0)
    if window_ids_BT is not None:
        kwin = kv_window_ids_BS if kv_window_ids_BS is not None else window_ids_BT
        mask = mask & ((kwin[:, None, :] == 0) | (kwin[:, None, :] == window_ids_BT[:, :, None]))
    return mask


def reference_attention(q_BTNH, k_BSKH, v_BSKH, *, doc_ids=None, window_ids=None, causal=True,
                        sm_scale=None, mask_BTS=None):
    """Softmax attention in fp32 with GQA (N query heads over K kv heads). Returns o_BTNH in q's dtype.

    Rows whose mask is empty (padding) return zeros rather than NaN.
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    assert N % K == 0, f"{N} query heads are not a multiple of {K} kv heads"
    scale = H ** -0.5 if sm_scale is None else sm_scale
    if mask_BTS is None:
        mask_BTS = attention_mask(doc_ids, window_ids, T, S, causal=causal)
    mask_BTS = jnp.broadcast_to(mask_BTS, (B, T, S))
    q_BTKGH = q_BTNH.astype(jnp.float32).reshape(B, T, K, N // K, H)
    s_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH.astype(jnp.float32)) * scale
    m = mask_BTS[:, None, None, :, :]
    s_BKGTS = jnp.where(m, s_BKGTS, _MASK_VALUE)
    p = jax.nn.softmax(s_BKGTS, axis=-1)
    p = jnp.where(m, p, 0.0)
    o_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", p, v_BSKH.astype(jnp.float32))
    return o_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)
