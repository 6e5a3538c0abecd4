"""Memory-linear blockwise attention in plain XLA: the path for CPU and GPU at long context.

Each q-block loops only over the k-blocks its block-mask row keeps (block_mask.schedule), with an
online softmax in fp32; the backward recomputes scores block by block (one pass for dq over each
q-block's k-blocks, one for dk/dv over each k-block's q-blocks), so nothing of size T x S is ever
stored. GQA: the G = N / K query heads of a kv head share its k/v block, never repeated in memory.

Shape letters (klong_jax/models/__init__.py): N query heads, K kv heads, H head dim; in one block pair,
T the query block's tokens and S the key block's.
"""
import functools

import jax.numpy as jnp
from jax import lax

from kernels import block_mask as bm
from kernels.vjp import attention_with_vjp, check_shapes, row_dot, self_attention_segments

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class _Blocked:
    """Padded, block-reshaped views of one call's operands and ids."""

    def __init__(self, q_BTNH, k_BSKH, q_seg, k_seg, block_q, block_k, causal):
        B, T, N, H = q_BTNH.shape
        S, K = k_BSKH.shape[1], k_BSKH.shape[2]
        self.B, self.T, self.S, self.N, self.K, self.G, self.H = B, T, S, N, K, N // K, H
        self.bq, self.bk = min(block_q, _round_up(T, 8)), min(block_k, _round_up(S, 8))
        self.nq, self.nk = -(-T // self.bq), -(-S // self.bk)
        self.Tp, self.Sp = self.nq * self.bq, self.nk * self.bk
        self.q_seg = bm.pad_segments(q_seg, self.Tp)
        self.k_seg = bm.pad_segments(k_seg, self.Sp)
        kinds = bm.block_kinds(self.q_seg, self.k_seg, self.bq, self.bk, causal=causal)
        self.codes, self.counts = bm.schedule(kinds)                       # per q-block row
        self.codes_t, self.counts_t = bm.schedule(kinds.transpose(0, 2, 1))  # per k-block column
        self.q_pos, self.k_pos = bm.positions_of(self.q_seg), bm.positions_of(self.k_seg)

    def q_view(self, x_BTNH, dtype=None):  # -> [B, Tp, K, G, H]
        x = _pad_axis1(x_BTNH, self.Tp)
        x = x if dtype is None else x.astype(dtype)
        return x.reshape(self.B, self.Tp, self.K, self.G, x.shape[-1])

    def kv_view(self, x_BSKH):
        return _pad_axis1(x_BSKH, self.Sp)

    def q_ids(self, b, start):
        return _ids_at(self.q_seg, self.q_pos, b, start, self.bq)

    def k_ids(self, b, start):
        return _ids_at(self.k_seg, self.k_pos, b, start, self.bk)


def _round_up(x, m):
    return -(-x // m) * m


def _pad_axis1(x, length):
    extra = length - x.shape[1]
    return x if extra == 0 else jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))


def _slice(x, b, start, size):
    """x[b, start:start+size] for traced b and start."""
    return lax.dynamic_slice_in_dim(lax.dynamic_index_in_dim(x, b, 0, keepdims=False), start, size, 0)


def _ids_at(seg, pos, b, start, size):
    win = None if seg.win is None else _slice(seg.win, b, start, size)
    return _slice(seg.doc, b, start, size), win, _slice(pos, b, start, size)


def _mask(q_ids, k_ids, causal):
    (qd, qw, qp), (kd, kw, kp) = q_ids, k_ids
    return bm.token_mask(qd[:, None], kd[None, :], causal=causal, q_pos=qp[:, None], k_pos=kp[None, :],
                         q_win=None if qw is None else qw[:, None], k_win=None if kw is None else kw[None, :])


def _scores(q_TKGH, k_SKH, scale):  # one block pair -> [K, G, T, S] fp32
    return jnp.einsum("TKGH,SKH->KGTS", q_TKGH, k_SKH, preferred_element_type=jnp.float32) * scale


def _split_bi(bi, n):
    return bi // n, bi % n


def core_fwd(q_BTNH, k_BSKH, v_BSKH, q_seg, k_seg, *, causal, scale, out_dtype,
             block_q=512, block_k=512):
    x = _Blocked(q_BTNH, k_BSKH, q_seg, k_seg, block_q, block_k, causal)
    q, k, v = x.q_view(q_BTNH), x.kv_view(k_BSKH), x.kv_view(v_BSKH)

    def one_q_block(bi):
        b, i = _split_bi(bi, x.nq)
        q_blk = _slice(q, b, i * x.bq, x.bq)
        q_ids = x.q_ids(b, i * x.bq)

        def visit(j, carry):
            m, l, acc = carry
            kb = x.codes[b, i, j] >> 2
            k_blk, v_blk = _slice(k, b, kb * x.bk, x.bk), _slice(v, b, kb * x.bk, x.bk)
            mask = _mask(q_ids, x.k_ids(b, kb * x.bk), causal)
            s = jnp.where(mask, _scores(q_blk, k_blk, scale), MASK_VALUE)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("KGTS,SKH->KGTH", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

        init = (jnp.full((x.K, x.G, x.bq), MASK_VALUE, jnp.float32), jnp.zeros((x.K, x.G, x.bq), jnp.float32),
                jnp.zeros((x.K, x.G, x.bq, x.H), jnp.float32))
        m, l, acc = lax.fori_loop(0, x.counts[b, i], visit, init)
        o = acc * jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)[..., None]
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
        return o.astype(out_dtype), lse

    o, lse = lax.map(one_q_block, jnp.arange(x.B * x.nq))
    # [B*I, K, G, bq, H] -> [B, Tp, N, H];  [B*I, K, G, bq] -> [B, N, Tp]  (I = nq query blocks)
    o = o.reshape(x.B, x.nq, x.N, x.bq, x.H).transpose(0, 1, 3, 2, 4).reshape(x.B, x.Tp, x.N, x.H)
    lse = lse.reshape(x.B, x.nq, x.N, x.bq).transpose(0, 2, 1, 3).reshape(x.B, x.N, x.Tp)
    return o[:, :x.T], lse[:, :, :x.T]


def core_bwd(q_BTNH, k_BSKH, v_BSKH, o_BTNH, lse_BNT, do_BTNH, q_seg, k_seg, *, causal, scale,
             grad_dtype=jnp.float32, block_q=512, block_k=512):
    x = _Blocked(q_BTNH, k_BSKH, q_seg, k_seg, block_q, block_k, causal)
    q, k, v = x.q_view(q_BTNH), x.kv_view(k_BSKH), x.kv_view(v_BSKH)
    do = x.q_view(do_BTNH, v_BSKH.dtype)
    # Per-query stats as [B, Tp, K, G]; padded rows get lse = +inf so their probabilities are 0.
    def stat_view(s_BNT, fill):
        s = jnp.pad(s_BNT, ((0, 0), (0, 0), (0, x.Tp - x.T)), constant_values=fill)
        return s.transpose(0, 2, 1).reshape(x.B, x.Tp, x.K, x.G)
    lse = stat_view(lse_BNT, jnp.inf)
    di = stat_view(row_dot(o_BTNH, do_BTNH), 0.0)

    def probs(b, qs, ks, q_blk, k_blk, v_blk, do_blk):
        """p and dS = p * (dP - di) for one block pair, [K, G, bq, bk] fp32."""
        mask = _mask(x.q_ids(b, qs), x.k_ids(b, ks), causal)
        lse_blk = _slice(lse, b, qs, x.bq).transpose(1, 2, 0)[..., None]
        di_blk = _slice(di, b, qs, x.bq).transpose(1, 2, 0)[..., None]
        p = jnp.where(mask, jnp.exp(_scores(q_blk, k_blk, scale) - lse_blk), 0.0)
        dp = jnp.einsum("TKGH,SKH->KGTS", do_blk, v_blk, preferred_element_type=jnp.float32)
        return p, p * (dp - di_blk)

    def dq_of_q_block(bi):
        b, i = _split_bi(bi, x.nq)
        qs = i * x.bq
        q_blk, do_blk = _slice(q, b, qs, x.bq), _slice(do, b, qs, x.bq)

        def visit(j, dq):
            ks = (x.codes[b, i, j] >> 2) * x.bk
            k_blk = _slice(k, b, ks, x.bk)
            _, ds = probs(b, qs, ks, q_blk, k_blk, _slice(v, b, ks, x.bk), do_blk)
            return dq + jnp.einsum("KGTS,SKH->TKGH", ds.astype(k_blk.dtype), k_blk,
                                   preferred_element_type=jnp.float32)

        dq = lax.fori_loop(0, x.counts[b, i], visit, jnp.zeros((x.bq, x.K, x.G, x.H), jnp.float32))
        return (dq * scale).astype(grad_dtype)

    def dkv_of_k_block(bj):
        b, kb = _split_bi(bj, x.nk)
        ks = kb * x.bk
        k_blk, v_blk = _slice(k, b, ks, x.bk), _slice(v, b, ks, x.bk)

        def visit(j, carry):
            dk, dv = carry
            qs = (x.codes_t[b, kb, j] >> 2) * x.bq
            q_blk, do_blk = _slice(q, b, qs, x.bq), _slice(do, b, qs, x.bq)
            p, ds = probs(b, qs, ks, q_blk, k_blk, v_blk, do_blk)
            dv = dv + jnp.einsum("KGTS,TKGH->SKH", p.astype(do_blk.dtype), do_blk,
                                 preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("KGTS,TKGH->SKH", ds.astype(q_blk.dtype), q_blk,
                                 preferred_element_type=jnp.float32)
            return dk, dv

        zeros = jnp.zeros((x.bk, x.K, x.H), jnp.float32)
        dk, dv = lax.fori_loop(0, x.counts_t[b, kb], visit, (zeros, zeros))
        return (dk * scale).astype(grad_dtype), dv.astype(grad_dtype)

    dq = lax.map(dq_of_q_block, jnp.arange(x.B * x.nq)).reshape(x.B, x.Tp, x.N, x.H)
    dk, dv = lax.map(dkv_of_k_block, jnp.arange(x.B * x.nk))
    dk = dk.reshape(x.B, x.Sp, x.K, x.H)
    dv = dv.reshape(x.B, x.Sp, x.K, x.H)
    return dq[:, :x.T], dk[:, :x.S], dv[:, :x.S]


def blockwise_attention(q_BTNH, k_BSKH, v_BSKH, *, doc_ids=None, window_ids=None, causal=True,
                        sm_scale=None, block_q: int = 512, block_k: int = 512):
    """Self-attention with the klong mask, memory linear in T; o_BTNH in q's dtype."""
    check_shapes(q_BTNH, k_BSKH, v_BSKH, "kernels/blockwise.py")
    if k_BSKH.shape[1] != q_BTNH.shape[1]:
        raise ValueError("kernels/blockwise.py: self-attention needs as many keys as queries")
    scale = q_BTNH.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    seg = self_attention_segments(q_BTNH, doc_ids, window_ids)
    fwd = functools.partial(core_fwd, block_q=block_q, block_k=block_k)
    bwd = functools.partial(core_bwd, block_q=block_q, block_k=block_k)
    return attention_with_vjp(fwd, bwd, q_BTNH, k_BSKH, v_BSKH, seg, seg, causal=causal, scale=scale)
