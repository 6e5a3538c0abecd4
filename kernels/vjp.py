"""The custom_vjp every blocked implementation shares: forward saves (o, lse), backward recomputes.

An implementation supplies two "core" functions over unpadded token segments:
  core_fwd(q_BTHD, k_BSKD, v_BSKD, q_seg, k_seg, *, causal, scale, out_dtype) -> (o_BTHD, lse_BHT f32)
  core_bwd(q_BTHD, k_BSKD, v_BSKD, o_BTHD, lse_BHT, do_BTHD, q_seg, k_seg, *, causal, scale, grad_dtype)
      -> (dq_BTHD, dk_BSKD, dv_BSKD) in grad_dtype (accumulated in fp32; ring attention asks for fp32)
lse is -inf on rows that attend to nothing (their output is 0). Ring attention calls the same cores
per pair of sequence chunks and combines them itself.
"""
import jax
import jax.numpy as jnp

from kernels.block_mask import Segments, make_segments


def check_shapes(q_BTHD, k_BSKD, v_BSKD, where: str):
    if q_BTHD.ndim != 4 or k_BSKD.ndim != 4 or v_BSKD.shape != k_BSKD.shape:
        raise ValueError(f"{where}: expected q [B,T,H,D], k = v [B,S,K,D]; got {q_BTHD.shape}, "
                         f"{k_BSKD.shape}, {v_BSKD.shape}")
    B, T, H, D = q_BTHD.shape
    if k_BSKD.shape[0] != B or k_BSKD.shape[3] != D:
        raise ValueError(f"{where}: q {q_BTHD.shape} and k {k_BSKD.shape} disagree on batch or head dim")
    if H % k_BSKD.shape[2]:
        raise ValueError(f"{where}: {H} query heads are not a multiple of {k_BSKD.shape[2]} kv heads")


def row_dot(o_BTHD, do_BTHD):
    """di = rowsum(o * do) per query and head, [B, H, T] fp32: the softmax-backward correction."""
    return jnp.einsum("bthd,bthd->bht", o_BTHD.astype(jnp.float32), do_BTHD.astype(jnp.float32))


def attention_with_vjp(core_fwd, core_bwd, q_BTHD, k_BSKD, v_BSKD, q_seg: Segments, k_seg: Segments,
                       *, causal: bool, scale: float):
    """o_BTHD in q's dtype, differentiable in q, k, v through the cores."""

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
    return attend(q_BTHD, k_BSKD, v_BSKD, q_seg, k_seg)


def self_attention_segments(q_BTHD, doc_ids, window_ids) -> Segments:
    B, T = q_BTHD.shape[:2]
    return make_segments(B, T, doc_ids, window_ids)
