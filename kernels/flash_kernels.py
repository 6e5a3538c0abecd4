"""Pallas TPU kernel bodies for klong flash attention (the pallas_calls live in flash_attention.py).

Every body runs one grid step: one (q-block, k-block) pair from the scalar-prefetched schedule,
decoded as block * 4 + kind. FULL tiles skip the token mask, PARTIAL tiles build it from the ids,
SKIP steps (past a row's count) do nothing. Softmax statistics are kept as (bq, 128) lane-replicated
columns in VMEM; per-token ids and lse / di arrive as lane-dense (1, bq) rows and are transposed here.
Shape letters (klong_jax/models/__init__.py): T the tokens of the query block (bq), W the 128 lanes.
"""
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import block_mask as bm

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LANES = 128
NT = (((1,), (1,)), ((), ()))   # contract the last dims: A @ B^T
TN = (((0,), (0,)), ((), ()))   # contract the first dims: A^T @ B


# ---------------------------------------------------------------------------------------------------
# In-kernel helpers
# ---------------------------------------------------------------------------------------------------
def _lanes_to(x_TW, n):
    """A (bq, 128) lane-replicated column widened (or cut) to (bq, n)."""
    if n == LANES:
        return x_TW
    if n % LANES == 0:
        return jnp.tile(x_TW, (1, n // LANES))
    if n < LANES:
        return x_TW[:, :n]
    raise ValueError(f"width {n} must be below {LANES} or a multiple of it")


def _row_to_column(row_1T):
    """(1, bq) row -> (bq, 128) lane-replicated column (a transpose on the XLU)."""
    return jnp.broadcast_to(row_1T, (LANES, row_1T.shape[1])).T


class Ids:
    """Which per-token id arrays a call carries (static), and how to build a tile's mask from them."""

    def __init__(self, has_win: bool, has_pos: bool, causal: bool):
        self.has_win, self.has_pos, self.causal = has_win, has_pos, causal
        self.names = ("doc",) + (("win",) if has_win else ()) + (("pos",) if has_pos and causal else ())

    def arrays(self, seg: bm.Segments):
        """Each id as a [B, 1, T] row."""
        return [getattr(seg, n)[:, None, :] for n in self.names]

    def mask(self, q_cols, k_rows, q_start, k_start, bq, bk):
        """(bq, bk) bool: q_cols are (bq, 128) columns, k_rows are (1, bk) rows, in `names` order."""
        q = {n: _lanes_to(c, bk) for n, c in zip(self.names, q_cols)}
        k = dict(zip(self.names, k_rows))
        if self.causal and not self.has_pos:
            q["pos"] = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            k["pos"] = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        return bm.token_mask(q["doc"], k["doc"], causal=self.causal, q_pos=q.get("pos"), k_pos=k.get("pos"),
                             q_win=q.get("win"), k_win=k.get("win"))


def _split(refs, counts):
    out, at = [], 0
    for c in counts:
        out.append(refs[at:at + c])
        at += c
    return out


def _decode(code):
    return code >> 2, code & 3


# ---------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------
def fwd_kernel(codes_ref, q_ref, k_ref, v_ref, *refs, ids: Ids, scale, bq, bk, steps):
    n = len(ids.names)
    q_id_refs, k_id_refs, (o_ref, lse_ref), (m_sc, l_sc, acc_sc), q_col_sc = _split(refs, (n, n, 2, 3, n))
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    k_block, kind = _decode(codes_ref[b, i, j])

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
        for ref, sc in zip(q_id_refs, q_col_sc):
            sc[...] = _row_to_column(ref[...])

    def visit(masked):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * scale
        if masked:
            mask = ids.mask([sc[...] for sc in q_col_sc], [r[...] for r in k_id_refs], i * bq, k_block * bk, bq, bk)
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev, l_prev = m_sc[...], l_sc[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1)[:, None])
        p = jnp.exp(s - _lanes_to(m_next, bk))
        if masked:
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_next)
        m_sc[...] = m_next
        l_sc[...] = alpha * l_prev + jnp.sum(p, axis=1)[:, None]
        pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_sc[...] = acc_sc[...] * _lanes_to(alpha, acc_sc.shape[1]) + pv

    pl.when(kind == bm.FULL)(lambda: visit(False))
    pl.when(kind == bm.PARTIAL)(lambda: visit(True))

    @pl.when(j == steps - 1)
    def _finish():
        l = l_sc[...]
        seen = l > 0.0
        safe_l = jnp.where(seen, l, 1.0)
        inv = jnp.where(seen, 1.0 / safe_l, 0.0)
        o_ref[...] = (acc_sc[...] * _lanes_to(inv, acc_sc.shape[1])).astype(o_ref.dtype)
        lse = jnp.where(seen, m_sc[...] + jnp.log(safe_l), -jnp.inf)
        lse_ref[...] = lse.T[0:1, :]


# ---------------------------------------------------------------------------------------------------
# Backward: dq
# ---------------------------------------------------------------------------------------------------
def _probs_and_ds(q, k, v, do, lse_col, di_col, mask, scale, bk):
    """P and dS = P * (dP - di) of one tile, fp32 (bq, bk)."""
    s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * scale
    p = jnp.exp(s - _lanes_to(lse_col, bk))
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    dp = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
    return p, p * (dp - _lanes_to(di_col, bk))


def dq_kernel(codes_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, ids: Ids, scale, bq, bk,
               steps):
    n = len(ids.names)
    q_id_refs, k_id_refs, (dq_ref,), (dq_sc, lse_sc, di_sc), q_col_sc = _split(refs, (n, n, 1, 3, n))
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    k_block, kind = _decode(codes_ref[b, i, j])

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
        lse_sc[...] = _row_to_column(lse_ref[...])
        di_sc[...] = _row_to_column(di_ref[...])
        for ref, sc in zip(q_id_refs, q_col_sc):
            sc[...] = _row_to_column(ref[...])

    def visit(masked):
        mask = None
        if masked:
            mask = ids.mask([sc[...] for sc in q_col_sc], [r[...] for r in k_id_refs], i * bq, k_block * bk, bq, bk)
        k = k_ref[...]
        _, ds = _probs_and_ds(q_ref[...], k, v_ref[...], do_ref[...], lse_sc[...], di_sc[...], mask, scale, bk)
        dq_sc[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    pl.when(kind == bm.FULL)(lambda: visit(False))
    pl.when(kind == bm.PARTIAL)(lambda: visit(True))

    @pl.when(j == steps - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


# ---------------------------------------------------------------------------------------------------
# Backward: dk, dv
# ---------------------------------------------------------------------------------------------------
def dkv_kernel(codes_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, ids: Ids, scale, bq, bk,
                steps, groups):
    n = len(ids.names)
    q_id_refs, k_id_refs, (dk_ref, dv_ref), (dk_sc, dv_sc) = _split(refs, (n, n, 2, 2))
    b, kb, g, j = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    q_block, kind = _decode(codes_ref[b, kb, j])

    @pl.when((g == 0) & (j == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def visit(masked):
        mask = None
        if masked:
            q_cols = [_row_to_column(r[...]) for r in q_id_refs]
            mask = ids.mask(q_cols, [r[...] for r in k_id_refs], q_block * bq, kb * bk, bq, bk)
        q, do = q_ref[...], do_ref[...]
        p, ds = _probs_and_ds(q, k_ref[...], v_ref[...], do, _row_to_column(lse_ref[...]),
                              _row_to_column(di_ref[...]), mask, scale, bk)
        dv_sc[...] += lax.dot_general(p.astype(do.dtype), do, TN, preferred_element_type=jnp.float32)
        dk_sc[...] += lax.dot_general(ds.astype(q.dtype), q, TN, preferred_element_type=jnp.float32)

    pl.when(kind == bm.FULL)(lambda: visit(False))
    pl.when(kind == bm.PARTIAL)(lambda: visit(True))

    @pl.when((g == groups - 1) & (j == steps - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)
