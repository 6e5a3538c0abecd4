"""Token segments and the block-level mask metadata every blocked implementation skips work with.

The token mask (klong_method.md, shared-prefix packing): query q may attend to key k iff
  doc[q] == doc[k] != 0, pos[k] <= pos[q] (when causal), and (win[k] == 0 or win[k] == win[q]).
Blocked kernels never look at the T x S mask. They summarise each block of tokens by a few ints
(min/max of the ids over its real tokens) and classify each (q-block, k-block) pair as
  SKIP (0): no pair of tokens can attend, the block is not computed at all;
  PARTIAL (1): computed with the token mask applied;
  FULL (2): every pair attends, computed without a mask.
The classification is conservative (a block it calls SKIP or FULL truly is), so skipping is exact.
Shape letters (klong_jax/models/__init__.py): I query blocks, J key blocks.
"""
from typing import NamedTuple

import jax.numpy as jnp

SKIP, PARTIAL, FULL = 0, 1, 2
_BIG = jnp.iinfo(jnp.int32).max
_SMALL = jnp.iinfo(jnp.int32).min


class Segments(NamedTuple):
    """Per-token ids of one side (queries or keys), each [B, T] int32.

    doc: document id, 0 = padding (always present internally: one document when the caller gave none).
    win: window id (0 = shared prefix, k >= 1 = window k), or None for no prefix sharing.
    pos: packed-order position used by the causal rule, or None for 0..T-1 (ring attention passes the
      global positions of a device's tokens).
    """
    doc: jnp.ndarray
    win: jnp.ndarray | None = None
    pos: jnp.ndarray | None = None

    @property
    def length(self) -> int:
        return self.doc.shape[1]


def make_segments(batch: int, length: int, doc_ids=None, window_ids=None, positions=None) -> Segments:
    """Segments for the caller's ids: doc_ids=None means one document covering every token."""
    for name, ids in (("doc_ids", doc_ids), ("window_ids", window_ids), ("positions", positions)):
        if ids is not None and ids.shape != (batch, length):
            raise ValueError(f"kernels/block_mask.py: {name} has shape {ids.shape}, expected {(batch, length)}")
    doc = jnp.ones((batch, length), jnp.int32) if doc_ids is None else doc_ids.astype(jnp.int32)
    win = None if window_ids is None else window_ids.astype(jnp.int32)
    pos = None if positions is None else positions.astype(jnp.int32)
    return Segments(doc, win, pos)


def pad_segments(seg: Segments, length: int) -> Segments:
    """Pads to `length` tokens with doc id 0, so the padding attends to nothing and nothing attends to it."""
    extra = length - seg.length
    if extra == 0:
        return seg
    if extra < 0:
        raise ValueError(f"cannot pad {seg.length} tokens down to {length}")

    def pad(x):
        return None if x is None else jnp.pad(x, ((0, 0), (0, extra)))

    return Segments(pad(seg.doc), pad(seg.win), pad(seg.pos))


def positions_of(seg: Segments) -> jnp.ndarray:
    if seg.pos is not None:
        return seg.pos
    return jnp.broadcast_to(jnp.arange(seg.length, dtype=jnp.int32), seg.doc.shape)


def token_mask(q_doc, k_doc, *, causal, q_pos=None, k_pos=None, q_win=None, k_win=None):
    """The token rule on broadcastable id arrays (query ids on one axis, key ids on another)."""
    mask = (q_doc == k_doc) & (k_doc != 0)
    if causal:
        mask = mask & (k_pos <= q_pos)
    if q_win is not None:
        mask = mask & ((k_win == 0) | (k_win == q_win))
    return mask


class _BlockStats(NamedTuple):
    any_real: jnp.ndarray    # [B, n] some token is not padding
    all_real: jnp.ndarray    # [B, n] no token is padding
    doc_min: jnp.ndarray
    doc_max: jnp.ndarray
    pos_min: jnp.ndarray
    pos_max: jnp.ndarray
    win_min: jnp.ndarray | None      # over all real tokens
    win_max: jnp.ndarray | None
    has_prefix: jnp.ndarray | None   # some real token has window 0
    win_nz_min: jnp.ndarray | None   # over real tokens with window >= 1
    win_nz_max: jnp.ndarray | None


def _block_stats(seg: Segments, block: int) -> _BlockStats:
    B, T = seg.doc.shape
    n = T // block
    assert n * block == T, f"{T} tokens are not a whole number of blocks of {block}"

    def blocks(x):
        return x.reshape(B, n, block)

    real = blocks(seg.doc != 0)

    def rmin(x, where):
        return jnp.min(jnp.where(where, blocks(x), _BIG), axis=-1)

    def rmax(x, where):
        return jnp.max(jnp.where(where, blocks(x), _SMALL), axis=-1)

    pos = positions_of(seg)
    stats = dict(any_real=real.any(-1), all_real=real.all(-1),
                 doc_min=rmin(seg.doc, real), doc_max=rmax(seg.doc, real),
                 pos_min=rmin(pos, real), pos_max=rmax(pos, real),
                 win_min=None, win_max=None, has_prefix=None, win_nz_min=None, win_nz_max=None)
    if seg.win is not None:
        in_window = real & blocks(seg.win != 0)
        stats.update(win_min=rmin(seg.win, real), win_max=rmax(seg.win, real),
                     has_prefix=(real & blocks(seg.win == 0)).any(-1),
                     win_nz_min=rmin(seg.win, in_window), win_nz_max=rmax(seg.win, in_window))
    return _BlockStats(**stats)


def block_kinds(q_seg: Segments, k_seg: Segments, block_q: int, block_k: int, *, causal: bool):
    """[B, I, J] = [B, T/block_q, S/block_k] int32 of SKIP / PARTIAL / FULL (lengths must be whole blocks)."""
    if (q_seg.win is None) != (k_seg.win is None):
        raise ValueError("queries and keys must both have window ids or both not")
    q = _block_stats(q_seg, block_q)
    k = _block_stats(k_seg, block_k)

    def qk(a, b):  # query stat on axis 1, key stat on axis 2
        return a[:, :, None], b[:, None, :]

    q_any, k_any = qk(q.any_real, k.any_real)
    q_dmin, k_dmin = qk(q.doc_min, k.doc_min)
    q_dmax, k_dmax = qk(q.doc_max, k.doc_max)
    skip = ~(q_any & k_any) | (q_dmax < k_dmin) | (k_dmax < q_dmin)
    single_doc = (q_dmin == q_dmax) & (k_dmin == k_dmax) & (q_dmin == k_dmin)
    q_all, k_all = qk(q.all_real, k.all_real)
    full = q_all & k_all & single_doc
    if causal:
        q_pmin, k_pmin = qk(q.pos_min, k.pos_min)
        q_pmax, k_pmax = qk(q.pos_max, k.pos_max)
        skip = skip | (k_pmin > q_pmax)
        full = full & (k_pmax <= q_pmin)
    if q.win_min is not None:
        q_wmin, k_wnz_min = qk(q.win_min, k.win_nz_min)
        q_wmax, k_wnz_max = qk(q.win_max, k.win_nz_max)
        k_prefix = k.has_prefix[:, None, :]
        # Without prefix keys, a key attends only from its own window: skip when the ranges are apart.
        skip = skip | (~k_prefix & ((k_wnz_max < q_wmin) | (k_wnz_min > q_wmax)))
        # Every key is prefix, or every key and every query lie in one and the same window.
        k_no_window = k_wnz_min == _BIG
        one_window = (q_wmin == q_wmax) & (k_wnz_min == k_wnz_max) & (k_wnz_min == q_wmin)
        full = full & (k_no_window | one_window)
    return jnp.where(skip, SKIP, jnp.where(full, FULL, PARTIAL)).astype(jnp.int32)


def schedule(kinds_BIJ):
    """Compacts each row of a block-kind table into the blocks to visit, in ascending order.

    Returns (code [B, I, J] int32, count [B, I] int32): code[b, i, j] = block * 4 + kind for the j-th
    non-skipped block of row i; past `count` the block of the last visited entry repeats with kind
    SKIP, so a pipelined kernel fetches nothing new and computes nothing. (Given the transposed table
    [B, J, I], the same per key-block column.)
    """
    J = kinds_BIJ.shape[-1]
    active = kinds_BIJ != SKIP
    order = jnp.argsort(~active, axis=-1, stable=True).astype(jnp.int32)
    count = active.sum(-1).astype(jnp.int32)
    kind_sorted = jnp.take_along_axis(kinds_BIJ, order, axis=-1)
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    j = jnp.arange(J, dtype=jnp.int32)
    block = jnp.where(j < count[..., None], order, jnp.where(count[..., None] > 0, last, 0))
    return (block * 4 + kind_sorted).astype(jnp.int32), count


def fraction_computed(kinds_BIJ) -> float:
    """Share of (q-block, k-block) pairs a blocked kernel computes."""
    return float(jnp.mean((kinds_BIJ != SKIP).astype(jnp.float32)))
