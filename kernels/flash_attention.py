"""Pallas TPU flash attention with the klong mask (packing + shared-prefix windows), forward and backward.

Three kernels, one grid step per (q-block, k-block) pair that the block mask keeps:
  forward  grid (B, H, q-block, step): online softmax in fp32 over the k-blocks of the q-block's row;
  dq       grid (B, H, q-block, step): same schedule, accumulates dS @ K;
  dk, dv   grid (B, K, k-block, g, step): the k-block's column, over the G query heads of its kv head,
           accumulates P^T dO and dS^T Q in VMEM, so GQA never repeats K/V in memory.
The schedule (block_mask.schedule, passed by scalar prefetch) lists for each row the k-blocks to visit;
past the row's count, the last block repeats with kind SKIP: the pipeline fetches nothing new and the
body does not run, so compute and HBM traffic scale with the unmasked blocks. FULL blocks skip the
token mask, PARTIAL blocks build it from the ids.

Layout: heads are moved ahead of tokens ([B, H, T, D]) so each block is a (tokens, head_dim) tile.
Per-token ids and the per-row softmax stats (lse, di) travel as lane-dense rows [B, (H,) 1, T] and are
turned into columns in VMEM, which keeps their HBM footprint 4 bytes per token instead of 512.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import block_mask as bm
from kernels.vjp import attention_with_vjp, check_shapes, row_dot, self_attention_segments

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LANES = 128
NT = (((1,), (1,)), ((), ()))   # contract the last dims: A @ B^T
TN = (((0,), (0,)), ((), ()))   # contract the first dims: A^T @ B


# ---------------------------------------------------------------------------------------------------
# In-kernel helpers
# ---------------------------------------------------------------------------------------------------
def _lanes_to(x_QL, n):
    """A (bq, 128) lane-replicated column widened (or cut) to (bq, n)."""
    if n == LANES:
        return x_QL
    if n % LANES == 0:
        return jnp.tile(x_QL, (1, n // LANES))
    if n < LANES:
        return x_QL[:, :n]
    raise ValueError(f"width {n} must be below {LANES} or a multiple of it")


def _row_to_column(row_1Q):
    """(1, bq) row -> (bq, 128) lane-replicated column (a transpose on the XLU)."""
    return jnp.broadcast_to(row_1Q, (LANES, row_1Q.shape[1])).T


class _Ids:
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
def _fwd_kernel(codes_ref, q_ref, k_ref, v_ref, *refs, ids: _Ids, scale, bq, bk, steps):
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


def _dq_kernel(codes_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, ids: _Ids, scale, bq, bk,
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
def _dkv_kernel(codes_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, ids: _Ids, scale, bq, bk,
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


# ---------------------------------------------------------------------------------------------------
# pallas_call builders
# ---------------------------------------------------------------------------------------------------
class _Plan:
    """Static shapes of one call plus its padded ids and schedules (the same for forward and backward)."""

    def __init__(self, q_BTHD, k_BSKD, q_seg, k_seg, *, causal, block_q, block_k, interpret):
        B, T, H, D = q_BTHD.shape
        S, K = k_BSKD.shape[1], k_BSKD.shape[2]
        self.B, self.T, self.S, self.H, self.K, self.G, self.D = B, T, S, H, K, H // K, D
        if not interpret:
            # Mosaic tiles: score columns and the lse/id rows are lane-dense, so blocks are whole lanes.
            block_q, block_k = _round_up(block_q, LANES), _round_up(block_k, LANES)
        self.bq, self.bk = min(block_q, _round_up(T, LANES)), min(block_k, _round_up(S, LANES))
        self.nq, self.nk = -(-T // self.bq), -(-S // self.bk)
        self.Tp, self.Sp = self.nq * self.bq, self.nk * self.bk
        self.causal, self.interpret = causal, interpret
        q_seg, k_seg = bm.pad_segments(q_seg, self.Tp), bm.pad_segments(k_seg, self.Sp)
        self.ids = _Ids(q_seg.win is not None, q_seg.pos is not None, causal)
        self.q_ids, self.k_ids = self.ids.arrays(q_seg), self.ids.arrays(k_seg)
        kinds = bm.block_kinds(q_seg, k_seg, self.bq, self.bk, causal=causal)
        self.codes, _ = bm.schedule(kinds)
        self.codes_t, _ = bm.schedule(kinds.transpose(0, 2, 1))

    def heads_first(self, x, length):  # [B, T, H, D] -> [B, H, Tp, D]
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    def tokens_first(self, x, length):  # [B, H, Tp, D] -> [B, T, H, D]
        return x[:, :, :length].transpose(0, 2, 1, 3)

    def pairs(self):
        """Token pairs in the computed blocks, assuming causal halves the work (for cost estimates)."""
        return self.B * self.H * self.Tp * self.Sp * (0.5 if self.causal else 1.0)

    def params(self, n_parallel, n_arbitrary):
        return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary)


def _round_up(x, m):
    return -(-x // m) * m


def _nbytes(*arrays):
    return sum(a.size * a.dtype.itemsize for a in arrays)


def _fwd_call(plan: _Plan, q, k, v, *, scale, out_dtype):
    G, bq, bk, D = plan.G, plan.bq, plan.bk, plan.D
    n = len(plan.ids.names)
    q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i, j, c: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, D), lambda b, h, i, j, c: (b, h // G, c[b, i, j] >> 2, 0))
    q_id_spec = pl.BlockSpec((None, 1, bq), lambda b, h, i, j, c: (b, 0, i))
    k_id_spec = pl.BlockSpec((None, 1, bk), lambda b, h, i, j, c: (b, 0, c[b, i, j] >> 2))
    out_shape = [jax.ShapeDtypeStruct((plan.B, plan.H, plan.Tp, D), out_dtype),
                 jax.ShapeDtypeStruct((plan.B, plan.H, 1, plan.Tp), jnp.float32)]
    out_specs = [q_spec, pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, c: (b, h, 0, i))]
    scratch = [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
               pltpu.VMEM((bq, D), jnp.float32)] + [pltpu.VMEM((bq, LANES), jnp.int32)] * n
    kernel = functools.partial(_fwd_kernel, ids=plan.ids, scale=scale, bq=bq, bk=bk, steps=plan.nk)
    pairs = plan.pairs()
    cost = pl.CostEstimate(flops=int(4 * pairs * D), transcendentals=int(pairs),
                           bytes_accessed=int(_nbytes(q, k, v) + q.size * jnp.dtype(out_dtype).itemsize))
    return pl.pallas_call(
        kernel, out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(plan.B, plan.H, plan.nq, plan.nk),
            in_specs=[q_spec, kv_spec, kv_spec] + [q_id_spec] * n + [k_id_spec] * n,
            out_specs=out_specs, scratch_shapes=scratch),
        compiler_params=plan.params(3, 1), cost_estimate=cost, interpret=plan.interpret,
        name="klong_flash_fwd",
    )(plan.codes, q, k, v, *plan.q_ids, *plan.k_ids)


def _dq_call(plan: _Plan, q, k, v, do, lse, di, *, scale, out_dtype):
    G, bq, bk, D = plan.G, plan.bq, plan.bk, plan.D
    n = len(plan.ids.names)
    q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i, j, c: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, D), lambda b, h, i, j, c: (b, h // G, c[b, i, j] >> 2, 0))
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, c: (b, h, 0, i))
    q_id_spec = pl.BlockSpec((None, 1, bq), lambda b, h, i, j, c: (b, 0, i))
    k_id_spec = pl.BlockSpec((None, 1, bk), lambda b, h, i, j, c: (b, 0, c[b, i, j] >> 2))
    scratch = [pltpu.VMEM((bq, D), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
               pltpu.VMEM((bq, LANES), jnp.float32)] + [pltpu.VMEM((bq, LANES), jnp.int32)] * n
    kernel = functools.partial(_dq_kernel, ids=plan.ids, scale=scale, bq=bq, bk=bk, steps=plan.nk)
    pairs = plan.pairs()
    cost = pl.CostEstimate(flops=int(6 * pairs * D), transcendentals=int(pairs),
                           bytes_accessed=int(_nbytes(q, k, v, do, lse, di) + q.size * 4))
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(q.shape, out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(plan.B, plan.H, plan.nq, plan.nk),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + [q_id_spec] * n + [k_id_spec] * n,
            out_specs=q_spec, scratch_shapes=scratch),
        compiler_params=plan.params(3, 1), cost_estimate=cost, interpret=plan.interpret,
        name="klong_flash_dq",
    )(plan.codes, q, k, v, do, lse, di, *plan.q_ids, *plan.k_ids)


def _dkv_call(plan: _Plan, q, k, v, do, lse, di, *, scale, out_dtype):
    G, bq, bk, D = plan.G, plan.bq, plan.bk, plan.D
    n = len(plan.ids.names)
    # grid (b, kv head, k-block, g, step); the step-th q-block of k-block kb's column is c[b, kb, j].
    q_spec = pl.BlockSpec((None, None, bq, D), lambda b, kh, kb, g, j, c: (b, kh * G + g, c[b, kb, j] >> 2, 0))
    kv_spec = pl.BlockSpec((None, None, bk, D), lambda b, kh, kb, g, j, c: (b, kh, kb, 0))
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, kh, kb, g, j, c: (b, kh * G + g, 0, c[b, kb, j] >> 2))
    q_id_spec = pl.BlockSpec((None, 1, bq), lambda b, kh, kb, g, j, c: (b, 0, c[b, kb, j] >> 2))
    k_id_spec = pl.BlockSpec((None, 1, bk), lambda b, kh, kb, g, j, c: (b, 0, kb))
    scratch = [pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)]
    kernel = functools.partial(_dkv_kernel, ids=plan.ids, scale=scale, bq=bq, bk=bk, steps=plan.nq, groups=G)
    pairs = plan.pairs()
    cost = pl.CostEstimate(flops=int(8 * pairs * D), transcendentals=int(pairs),
                           bytes_accessed=int(_nbytes(q, k, v, do, lse, di) + 2 * k.size * 4))
    kv_shape = jax.ShapeDtypeStruct(k.shape, out_dtype)
    return pl.pallas_call(
        kernel, out_shape=[kv_shape, kv_shape],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(plan.B, plan.K, plan.nk, G, plan.nq),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + [q_id_spec] * n + [k_id_spec] * n,
            out_specs=[kv_spec, kv_spec], scratch_shapes=scratch),
        compiler_params=plan.params(3, 2), cost_estimate=cost, interpret=plan.interpret,
        name="klong_flash_dkv",
    )(plan.codes_t, q, k, v, do, lse, di, *plan.q_ids, *plan.k_ids)


# ---------------------------------------------------------------------------------------------------
# Cores (see kernels/vjp.py) and the public entry point
# ---------------------------------------------------------------------------------------------------
def _on_platform(fn, interpret, *args):
    """interpret=None: Mosaic when lowering for TPU, interpret mode (plain HLO) anywhere else."""
    if interpret is not None:
        return fn(*args, interpret=bool(interpret))
    return lax.platform_dependent(*args, tpu=functools.partial(fn, interpret=False),
                                  default=functools.partial(fn, interpret=True))


def core_fwd(q_BTHD, k_BSKD, v_BSKD, q_seg, k_seg, *, causal, scale, out_dtype, block_q=512, block_k=512,
             interpret=None):
    def run(q_BTHD, k_BSKD, v_BSKD, q_seg, k_seg, *, interpret):
        plan = _Plan(q_BTHD, k_BSKD, q_seg, k_seg, causal=causal, block_q=block_q, block_k=block_k,
                     interpret=interpret)
        q, k, v = plan.heads_first(q_BTHD, plan.Tp), plan.heads_first(k_BSKD, plan.Sp), plan.heads_first(v_BSKD, plan.Sp)
        o, lse = _fwd_call(plan, q, k, v, scale=scale, out_dtype=out_dtype)
        return plan.tokens_first(o, plan.T), lse[:, :, 0, :plan.T]

    return _on_platform(run, interpret, q_BTHD, k_BSKD, v_BSKD, q_seg, k_seg)


def core_bwd(q_BTHD, k_BSKD, v_BSKD, o_BTHD, lse_BHT, do_BTHD, q_seg, k_seg, *, causal, scale, block_q=512,
             block_k=512, interpret=None):
    def run(q_BTHD, k_BSKD, v_BSKD, o_BTHD, lse_BHT, do_BTHD, q_seg, k_seg, *, interpret):
        plan = _Plan(q_BTHD, k_BSKD, q_seg, k_seg, causal=causal, block_q=block_q, block_k=block_k,
                     interpret=interpret)
        q, k, v = plan.heads_first(q_BTHD, plan.Tp), plan.heads_first(k_BSKD, plan.Sp), plan.heads_first(v_BSKD, plan.Sp)
        do = plan.heads_first(do_BTHD.astype(q_BTHD.dtype), plan.Tp)
        pad = ((0, 0), (0, 0), (0, plan.Tp - plan.T))
        # Padded query rows: lse 0 and di 0 are finite; their probabilities are masked to 0 anyway.
        lse = jnp.pad(jnp.where(jnp.isfinite(lse_BHT), lse_BHT, jnp.inf), pad)[:, :, None, :]
        di = jnp.pad(row_dot(o_BTHD, do_BTHD), pad)[:, :, None, :]
        dq = _dq_call(plan, q, k, v, do, lse, di, scale=scale, out_dtype=jnp.float32)
        dk, dv = _dkv_call(plan, q, k, v, do, lse, di, scale=scale, out_dtype=jnp.float32)
        return plan.tokens_first(dq, plan.T), plan.tokens_first(dk, plan.S), plan.tokens_first(dv, plan.S)

    return _on_platform(run, interpret, q_BTHD, k_BSKD, v_BSKD, o_BTHD, lse_BHT, do_BTHD, q_seg, k_seg)


def flash_attention(q_BTHD, k_BSKD, v_BSKD, *, doc_ids=None, window_ids=None, causal=True, sm_scale=None,
                    block_q: int = 512, block_k: int = 512, interpret=None):
    """Self-attention with the klong mask as Pallas TPU kernels; o_BTHD in q's dtype.

    q [B, T, H, D], k = v [B, T, K, D] with K dividing H; doc_ids / window_ids [B, T] int (see
    block_mask.py). T need not be a multiple of the blocks. interpret=None runs Mosaic on TPU and
    interpret mode elsewhere; True / False force one.
    """
    check_shapes(q_BTHD, k_BSKD, v_BSKD, "kernels/flash_attention.py")
    if k_BSKD.shape[1] != q_BTHD.shape[1]:
        raise ValueError("kernels/flash_attention.py: self-attention needs as many keys as queries")
    scale = q_BTHD.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    seg = self_attention_segments(q_BTHD, doc_ids, window_ids)
    blocks = dict(block_q=block_q, block_k=block_k, interpret=interpret)
    return attention_with_vjp(functools.partial(core_fwd, **blocks), functools.partial(core_bwd, **blocks),
                              q_BTHD, k_BSKD, v_BSKD, seg, seg, causal=causal, scale=scale)
