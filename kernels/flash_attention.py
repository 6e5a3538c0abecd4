"""Pallas TPU flash attention with the klong mask (packing + shared-prefix windows), forward and backward.

Three kernels, one grid step per (q-block, k-block) pair that the block mask keeps:
  forward  grid (B, N, q-block, step): online softmax in fp32 over the k-blocks of the q-block's row;
  dq       grid (B, N, q-block, step): same schedule, accumulates dS @ K;
  dk, dv   grid (B, K, k-block, g, step): the k-block's column, over the G query heads of its kv head,
           accumulates P^T dO and dS^T Q in VMEM, so GQA never repeats K/V in memory.
The schedule (block_mask.schedule, passed by scalar prefetch) lists for each row the k-blocks to visit;
past the row's count, the last block repeats with kind SKIP: the pipeline fetches nothing new and the
body does not run, so compute and HBM traffic scale with the unmasked blocks. FULL blocks skip the
token mask, PARTIAL blocks build it from the ids.

Layout: heads are moved ahead of tokens ([B, N, T, H]) so each block is a (tokens, head_dim) tile.
Per-token ids and the per-row softmax stats (lse, di) travel as lane-dense rows [B, (N,) 1, T] and are
turned into columns in VMEM, which keeps their HBM footprint 4 bytes per token instead of 512.
Shape letters (klong_jax/models/__init__.py): N query heads, K kv heads, G = N / K, H head dim.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import block_mask as bm
from kernels.flash_kernels import LANES, Ids, dkv_kernel, dq_kernel, fwd_kernel
from kernels.vjp import attention_with_vjp, check_shapes, row_dot, self_attention_segments

SMEM_SCHEDULE_BYTES = 512 * 1024  # of the 1 MiB of SMEM on v5p, the rest left to Mosaic


# ---------------------------------------------------------------------------------------------------
# pallas_call builders
# ---------------------------------------------------------------------------------------------------
class _Plan:
    """Static shapes of one call plus its padded ids and schedules (the same for forward and backward)."""

    def __init__(self, q_BTNH, k_BSKH, q_seg, k_seg, *, causal, block_q, block_k, interpret):
        B, T, N, H = q_BTNH.shape
        S, K = k_BSKH.shape[1], k_BSKH.shape[2]
        self.B, self.T, self.S, self.N, self.K, self.G, self.H = B, T, S, N, K, N // K, H
        if not interpret:
            # Mosaic tiles: score columns and the lse/id rows are lane-dense, so blocks are whole lanes.
            block_q, block_k = _round_up(block_q, LANES), _round_up(block_k, LANES)
            # The schedule is scalar-prefetched into SMEM (1 MiB on v5p, shared with Mosaic's own use):
            # at very long sequences the blocks grow (up to 1024, beyond which scores outgrow the
            # default scoped VMEM) until one row's schedule fits the budget.
            while _schedule_bytes(T, S, block_q, block_k) > SMEM_SCHEDULE_BYTES and max(block_q, block_k) < 1024:
                block_q, block_k = 2 * block_q, 2 * block_k
            if _schedule_bytes(T, S, block_q, block_k) > SMEM_SCHEDULE_BYTES and jax.default_backend() == "tpu":
                raise ValueError(f"kernels/flash_attention.py: {T} x {S} tokens in one call is too long for the "
                                 f"block schedule in SMEM; shard the sequence with ring attention")
        self.bq, self.bk = min(block_q, _round_up(T, LANES)), min(block_k, _round_up(S, LANES))
        self.nq, self.nk = -(-T // self.bq), -(-S // self.bk)
        self.Tp, self.Sp = self.nq * self.bq, self.nk * self.bk
        self.causal, self.interpret = causal, interpret
        q_seg, k_seg = bm.pad_segments(q_seg, self.Tp), bm.pad_segments(k_seg, self.Sp)
        self.ids = Ids(q_seg.win is not None, q_seg.pos is not None, causal)
        self.q_ids, self.k_ids = self.ids.arrays(q_seg), self.ids.arrays(k_seg)
        kinds = bm.block_kinds(q_seg, k_seg, self.bq, self.bk, causal=causal)
        self.codes, _ = bm.schedule(kinds)
        self.codes_t, _ = bm.schedule(kinds.transpose(0, 2, 1))
        # Each pallas_call takes as many batch rows as their schedules fit the SMEM budget.
        fit = max(1, SMEM_SCHEDULE_BYTES // (self.nq * self.nk * 4))
        self.batch_group = max(g for g in range(1, B + 1) if B % g == 0 and g <= fit)

    def heads_first(self, x, length):  # [B, T, N, H] -> [B, N, Tp, H]
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    def tokens_first(self, x, length):  # [B, N, Tp, H] -> [B, T, N, H]
        return x[:, :, :length].transpose(0, 2, 1, 3)

    def pairs(self, batch):
        """Token pairs in the computed blocks, assuming causal halves the work (for cost estimates)."""
        return batch * self.N * self.Tp * self.Sp * (0.5 if self.causal else 1.0)

    def by_batch_groups(self, fn, *arrays):
        """fn over groups of batch rows whose schedule fits SMEM (lax.map over the groups)."""
        if self.batch_group == self.B:
            return fn(*arrays)
        groups = self.B // self.batch_group
        split = jax.tree.map(lambda x: x.reshape(groups, self.batch_group, *x.shape[1:]), arrays)
        out = lax.map(lambda a: fn(*a), split)
        return jax.tree.map(lambda x: x.reshape(self.B, *x.shape[2:]), out)

    def params(self, n_parallel, n_arbitrary):
        return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary)


def _round_up(x, m):
    return -(-x // m) * m


def _schedule_bytes(T, S, block_q, block_k):
    return -(-T // block_q) * -(-S // block_k) * 4


def _nbytes(*arrays):
    return sum(a.size * a.dtype.itemsize for a in arrays)


def _fwd_call(plan: _Plan, codes, q, k, v, q_ids, k_ids, *, scale, out_dtype):
    B, G, bq, bk, H = q.shape[0], plan.G, plan.bq, plan.bk, plan.H
    n = len(plan.ids.names)
    q_spec = pl.BlockSpec((None, None, bq, H), lambda b, h, i, j, c: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, H), lambda b, h, i, j, c: (b, h // G, c[b, i, j] >> 2, 0))
    q_id_spec = pl.BlockSpec((None, 1, bq), lambda b, h, i, j, c: (b, 0, i))
    k_id_spec = pl.BlockSpec((None, 1, bk), lambda b, h, i, j, c: (b, 0, c[b, i, j] >> 2))
    out_shape = [jax.ShapeDtypeStruct((B, plan.N, plan.Tp, H), out_dtype),
                 jax.ShapeDtypeStruct((B, plan.N, 1, plan.Tp), jnp.float32)]
    out_specs = [q_spec, pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, c: (b, h, 0, i))]
    scratch = [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
               pltpu.VMEM((bq, H), jnp.float32)] + [pltpu.VMEM((bq, LANES), jnp.int32)] * n
    kernel = functools.partial(fwd_kernel, ids=plan.ids, scale=scale, bq=bq, bk=bk, steps=plan.nk)
    pairs = plan.pairs(B)
    cost = pl.CostEstimate(flops=int(4 * pairs * H), transcendentals=int(pairs),
                           bytes_accessed=int(_nbytes(q, k, v) + q.size * jnp.dtype(out_dtype).itemsize))
    return pl.pallas_call(
        kernel, out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B, plan.N, plan.nq, plan.nk),
            in_specs=[q_spec, kv_spec, kv_spec] + [q_id_spec] * n + [k_id_spec] * n,
            out_specs=out_specs, scratch_shapes=scratch),
        compiler_params=plan.params(3, 1), cost_estimate=cost, interpret=plan.interpret,
        name="klong_flash_fwd",
    )(codes, q, k, v, *q_ids, *k_ids)


def _dq_call(plan: _Plan, codes, q, k, v, do, lse, di, q_ids, k_ids, *, scale, out_dtype):
    B, G, bq, bk, H = q.shape[0], plan.G, plan.bq, plan.bk, plan.H
    n = len(plan.ids.names)
    q_spec = pl.BlockSpec((None, None, bq, H), lambda b, h, i, j, c: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, H), lambda b, h, i, j, c: (b, h // G, c[b, i, j] >> 2, 0))
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, c: (b, h, 0, i))
    q_id_spec = pl.BlockSpec((None, 1, bq), lambda b, h, i, j, c: (b, 0, i))
    k_id_spec = pl.BlockSpec((None, 1, bk), lambda b, h, i, j, c: (b, 0, c[b, i, j] >> 2))
    scratch = [pltpu.VMEM((bq, H), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
               pltpu.VMEM((bq, LANES), jnp.float32)] + [pltpu.VMEM((bq, LANES), jnp.int32)] * n
    kernel = functools.partial(dq_kernel, ids=plan.ids, scale=scale, bq=bq, bk=bk, steps=plan.nk)
    pairs = plan.pairs(B)
    cost = pl.CostEstimate(flops=int(6 * pairs * H), transcendentals=int(pairs),
                           bytes_accessed=int(_nbytes(q, k, v, do, lse, di) + q.size * 4))
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(q.shape, out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B, plan.N, plan.nq, plan.nk),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + [q_id_spec] * n + [k_id_spec] * n,
            out_specs=q_spec, scratch_shapes=scratch),
        compiler_params=plan.params(3, 1), cost_estimate=cost, interpret=plan.interpret,
        name="klong_flash_dq",
    )(codes, q, k, v, do, lse, di, *q_ids, *k_ids)


def _dkv_call(plan: _Plan, codes_t, q, k, v, do, lse, di, q_ids, k_ids, *, scale, out_dtype):
    B, G, bq, bk, H = q.shape[0], plan.G, plan.bq, plan.bk, plan.H
    n = len(plan.ids.names)
    # grid (b, kv head, k-block, g, step); the step-th q-block of k-block kb's column is c[b, kb, j].
    q_spec = pl.BlockSpec((None, None, bq, H), lambda b, kh, kb, g, j, c: (b, kh * G + g, c[b, kb, j] >> 2, 0))
    kv_spec = pl.BlockSpec((None, None, bk, H), lambda b, kh, kb, g, j, c: (b, kh, kb, 0))
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, kh, kb, g, j, c: (b, kh * G + g, 0, c[b, kb, j] >> 2))
    q_id_spec = pl.BlockSpec((None, 1, bq), lambda b, kh, kb, g, j, c: (b, 0, c[b, kb, j] >> 2))
    k_id_spec = pl.BlockSpec((None, 1, bk), lambda b, kh, kb, g, j, c: (b, 0, kb))
    scratch = [pltpu.VMEM((bk, H), jnp.float32), pltpu.VMEM((bk, H), jnp.float32)]
    kernel = functools.partial(dkv_kernel, ids=plan.ids, scale=scale, bq=bq, bk=bk, steps=plan.nq, groups=G)
    pairs = plan.pairs(B)
    cost = pl.CostEstimate(flops=int(8 * pairs * H), transcendentals=int(pairs),
                           bytes_accessed=int(_nbytes(q, k, v, do, lse, di) + 2 * k.size * 4))
    kv_shape = jax.ShapeDtypeStruct(k.shape, out_dtype)
    return pl.pallas_call(
        kernel, out_shape=[kv_shape, kv_shape],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B, plan.K, plan.nk, G, plan.nq),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + [q_id_spec] * n + [k_id_spec] * n,
            out_specs=[kv_spec, kv_spec], scratch_shapes=scratch),
        compiler_params=plan.params(3, 2), cost_estimate=cost, interpret=plan.interpret,
        name="klong_flash_dkv",
    )(codes_t, q, k, v, do, lse, di, *q_ids, *k_ids)


# ---------------------------------------------------------------------------------------------------
# Cores (see kernels/vjp.py) and the public entry point
# ---------------------------------------------------------------------------------------------------
def _on_platform(fn, interpret, *args):
    """interpret=None: Mosaic when lowering for TPU, interpret mode (plain HLO) anywhere else."""
    if interpret is not None:
        return fn(*args, interpret=bool(interpret))
    return lax.platform_dependent(*args, tpu=functools.partial(fn, interpret=False),
                                  default=functools.partial(fn, interpret=True))


def core_fwd(q_BTNH, k_BSKH, v_BSKH, q_seg, k_seg, *, causal, scale, out_dtype, block_q=512, block_k=512,
             interpret=None):
    def run(q_BTNH, k_BSKH, v_BSKH, q_seg, k_seg, *, interpret):
        plan = _Plan(q_BTNH, k_BSKH, q_seg, k_seg, causal=causal, block_q=block_q, block_k=block_k,
                     interpret=interpret)
        q = plan.heads_first(q_BTNH, plan.Tp)
        k, v = plan.heads_first(k_BSKH, plan.Sp), plan.heads_first(v_BSKH, plan.Sp)
        o, lse = plan.by_batch_groups(functools.partial(_fwd_call, plan, scale=scale, out_dtype=out_dtype),
                                      plan.codes, q, k, v, plan.q_ids, plan.k_ids)
        return plan.tokens_first(o, plan.T), lse[:, :, 0, :plan.T]

    return _on_platform(run, interpret, q_BTNH, k_BSKH, v_BSKH, q_seg, k_seg)


def core_bwd(q_BTNH, k_BSKH, v_BSKH, o_BTNH, lse_BNT, do_BTNH, q_seg, k_seg, *, causal, scale,
             grad_dtype=jnp.float32, block_q=512, block_k=512, interpret=None):
    def run(q_BTNH, k_BSKH, v_BSKH, o_BTNH, lse_BNT, do_BTNH, q_seg, k_seg, *, interpret):
        plan = _Plan(q_BTNH, k_BSKH, q_seg, k_seg, causal=causal, block_q=block_q, block_k=block_k,
                     interpret=interpret)
        q = plan.heads_first(q_BTNH, plan.Tp)
        k, v = plan.heads_first(k_BSKH, plan.Sp), plan.heads_first(v_BSKH, plan.Sp)
        do = plan.heads_first(do_BTNH.astype(q_BTNH.dtype), plan.Tp)
        pad = ((0, 0), (0, 0), (0, plan.Tp - plan.T))
        # Padded query rows: lse 0 and di 0 are finite; their probabilities are masked to 0 anyway.
        lse = jnp.pad(jnp.where(jnp.isfinite(lse_BNT), lse_BNT, jnp.inf), pad)[:, :, None, :]
        di = jnp.pad(row_dot(o_BTNH, do_BTNH), pad)[:, :, None, :]
        dq = plan.by_batch_groups(functools.partial(_dq_call, plan, scale=scale, out_dtype=grad_dtype),
                                  plan.codes, q, k, v, do, lse, di, plan.q_ids, plan.k_ids)
        dk, dv = plan.by_batch_groups(functools.partial(_dkv_call, plan, scale=scale, out_dtype=grad_dtype),
                                      plan.codes_t, q, k, v, do, lse, di, plan.q_ids, plan.k_ids)
        return plan.tokens_first(dq, plan.T), plan.tokens_first(dk, plan.S), plan.tokens_first(dv, plan.S)

    return _on_platform(run, interpret, q_BTNH, k_BSKH, v_BSKH, o_BTNH, lse_BNT, do_BTNH, q_seg, k_seg)


def flash_attention(q_BTNH, k_BSKH, v_BSKH, *, doc_ids=None, window_ids=None, causal=True, sm_scale=None,
                    block_q: int = 512, block_k: int = 512, interpret=None):
    """Self-attention with the klong mask as Pallas TPU kernels; o_BTNH in q's dtype.

    q [B, T, N, H], k = v [B, T, K, H] with K dividing N; doc_ids / window_ids [B, T] int (see
    block_mask.py). T need not be a multiple of the blocks. interpret=None runs Mosaic on TPU and
    interpret mode elsewhere; True / False force one.
    """
    check_shapes(q_BTNH, k_BSKH, v_BSKH, "kernels/flash_attention.py")
    if k_BSKH.shape[1] != q_BTNH.shape[1]:
        raise ValueError("kernels/flash_attention.py: self-attention needs as many keys as queries")
    scale = q_BTNH.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    seg = self_attention_segments(q_BTNH, doc_ids, window_ids)
    blocks = dict(block_q=block_q, block_k=block_k, interpret=interpret)
    return attention_with_vjp(functools.partial(core_fwd, **blocks), functools.partial(core_bwd, **blocks),
                              q_BTNH, k_BSKH, v_BSKH, seg, seg, causal=causal, scale=scale)
