"""The custom_vjp every blocked implementation shares: forward saves (o, lse), backward recomputes.

An implementation supplies two "core" functions over unpadded token segments:
  core_fwd(q_BTNH, k_BSKH, v_BSKH, q_seg, k_seg, *, causal, scale, out_dtype) -> (o_BTNH, lse_BNT f32)
  core_bwd(q_BTNH, k_BSKH, v_BSKH, o_BTNH, lse_BNT, do_BTNH, q_seg, k_seg, *, causal, scale, grad_dtype)
      -> (dq_BTNH, dk_BSKH, dv_BSKH) in grad_dtype (accumulated in fp32; ring attention asks for fp32)
lse is -inf on rows that attend to nothing (their output is 0). Ring attention calls the same cores
per pair of sequence chunks and combines them itself. Shape letters: klong_jax/models/__init__.py.
"""
import jax
import jax.numpy as jnp

from kernels.block_mask import Segments, make_segments


def check_shapes(q_BTNH, k_BSKH, v_BSKH, where: str):
    if q_BTNH.ndim != 4 or k_BSKH.ndim != 4 or v_BSKH.shape != k_BSKH.shape:
        raise ValueError(f"{where}: expected q [B,T,N,H], k = v [B,S,K,H]; got {q_BTNH.shape}, "
                         f"{k_BSKH.shape}, {v_BSKH.shape}")
    B, T, N, H = q_BTNH.shape
    if k_BSKH.shape[0] != B or k_BSKH.shape[3] != H:
        raise ValueError(f"{where}: q {q_BTNH.shape} and k {k_BSKH.shape} disagree on batch or head dim")
    if N % k_BSKH.shape[2]:
        raise ValueError(f"{where}: {N} query heads are not a multiple of {k_BSKH.shape[2]} kv heads")


def row_dot(o_BTNH, do_BTNH):
    """di = rowsum(o * do) per query and head, [B, N, T] fp32: the softmax-backward correction."""
    return jnp.einsum("BTNH,BTNH->BNT", o_BTNH.astype(jnp.float32), do_BTNH.astype(jnp.float32))


def attention_with_vjp(core_fwd, core_bwd, q_BTNH, k_BSKH, v_BSKH, q_seg: Segments, k_seg: Segments,
                       *, causal: bool, scale: float):
    """o_BTNH in q's dtype, differentiable in q, k, v through the cores."""

    @jax.custom_vjp
    def attend(q, k, v, qs, ks):
        return core_fwd(q, k, v, qs, ks, causal=causal, scale=scale, out_dtype=q.dtype)[0]

    def fwd(q, k, v, qs, ks):
        o, lse = core_fwd(q, k, v, qs, ks, causal=causal, scale=scale, out_dtype=q.dtype)
        return o, (q, k, v, qs, ks, o, lse)

    def bwd(res, do):
        q, k, v, qs, ks, o, lse = res
        dq, dk, dv = core_bwd(q, k, v, o, lse, do, qs, ks, causal=causal, scale=scale, grad_dtype=q.dtype)
        no_grad = jax.tree.map(lambda _: None, (qs, ks))
        return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *no_grad)

    attend.defvjp(fwd, bwd)
    return attend(q_BTNH, k_BSKH, v_BSKH, q_seg, k_seg)


def self_attention_segments(q_BTNH, doc_ids, window_ids) -> Segments:
    B, T = q_BTNH.shape[:2]
    return make_segments(B, T, doc_ids, window_ids)
