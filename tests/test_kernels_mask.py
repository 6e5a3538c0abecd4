"""Block-mask metadata: SKIP and FULL are exact (checked against the token mask), schedules are complete."""
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import block_mask as bm
from kernels.reference import attention_mask
from kernels.testing import packed_batch

T = 192
ROWS = [
    [(40, [30, 25, 20]), (50, [])],            # shared prefix with 3 windows, then a plain document
    [(70, []), (30, [10, 40]), (10, [])],      # plain, shared-prefix, plain; 32 tokens of padding
]


def _token_mask(doc, win, causal, positions=None):
    seg = bm.Segments(doc, win, positions)
    pos = bm.positions_of(seg)
    return np.asarray(bm.token_mask(doc[:, :, None], doc[:, None, :], causal=causal, q_pos=pos[:, :, None],
                                    k_pos=pos[:, None, :], q_win=None if win is None else win[:, :, None],
                                    k_win=None if win is None else win[:, None, :]))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_windows", [True, False])
@pytest.mark.parametrize("bq,bk", [(32, 32), (16, 64)])
def test_block_kinds_are_exact_where_they_claim(causal, with_windows, bq, bk):
    doc, win = packed_batch(T, ROWS)
    win = win if with_windows else None
    mask = _token_mask(doc, win, causal)
    np.testing.assert_array_equal(mask, np.asarray(attention_mask(doc, win, T, T, causal=causal)))
    kinds = np.asarray(bm.block_kinds(bm.Segments(doc, win), bm.Segments(doc, win), bq, bk, causal=causal))
    tiles = mask.reshape(2, T // bq, bq, T // bk, bk).transpose(0, 1, 3, 2, 4)
    any_pair, all_pairs = tiles.any((-1, -2)), tiles.all((-1, -2))
    assert not any_pair[kinds == bm.SKIP].any(), "a skipped block holds an attending pair"
    assert all_pairs[kinds == bm.FULL].all(), "a full block holds a masked pair"


@pytest.mark.parametrize("causal", [True, False])
def test_block_kinds_are_tight_on_block_aligned_rows(causal):
    # Documents and windows that start on block boundaries: every block without pairs is skipped
    # and every block without masked pairs is full.
    doc, win = packed_batch(T, [[(64, [32, 32]), (32, [])], [(32, [32, 64]), (32, [])]])
    mask = _token_mask(doc, win, causal)
    kinds = np.asarray(bm.block_kinds(bm.Segments(doc, win), bm.Segments(doc, win), 32, 32, causal=causal))
    tiles = mask.reshape(2, 6, 32, 6, 32).transpose(0, 1, 3, 2, 4)
    np.testing.assert_array_equal(kinds == bm.SKIP, ~tiles.any((-1, -2)))
    np.testing.assert_array_equal(kinds == bm.FULL, tiles.all((-1, -2)))


def test_block_kinds_with_permuted_positions():
    doc, win = packed_batch(T, ROWS)
    perm = np.random.default_rng(0).permutation(T)
    pos = jnp.asarray(np.broadcast_to(perm, (2, T)).astype(np.int32))
    seg = bm.Segments(doc, win, pos)
    mask = _token_mask(doc, win, True, pos)
    kinds = np.asarray(bm.block_kinds(seg, seg, 32, 32, causal=True))
    tiles = mask.reshape(2, 6, 32, 6, 32).transpose(0, 1, 3, 2, 4)
    assert not tiles.any((-1, -2))[kinds == bm.SKIP].any()
    assert tiles.all((-1, -2))[kinds == bm.FULL].all()


def test_causal_fraction_and_shared_prefix_fraction():
    ones = jnp.ones((1, 1024), jnp.int32)
    kinds = bm.block_kinds(bm.Segments(ones), bm.Segments(ones), 128, 128, causal=True)
    assert bm.fraction_computed(kinds) == pytest.approx(36 / 64)
    # prefix of 4 blocks, 4 windows of 1 block: 10 (prefix) + 4 * (4 + 1) (windows) of 64 blocks.
    doc, win = packed_batch(1024, [[(512, [128] * 4)]])
    seg = bm.Segments(doc, win)
    assert bm.fraction_computed(bm.block_kinds(seg, seg, 128, 128, causal=True)) == pytest.approx(30 / 64)


def test_schedule_lists_each_kept_block_once_in_order():
    kinds = jnp.asarray([[[0, 2, 1, 0], [0, 0, 0, 0], [1, 0, 0, 2]]], jnp.int32)
    code, count = bm.schedule(kinds)
    np.testing.assert_array_equal(np.asarray(count), [[2, 0, 2]])
    np.testing.assert_array_equal(np.asarray(code >> 2), [[[1, 2, 2, 2], [0, 0, 0, 0], [0, 3, 3, 3]]])
    np.testing.assert_array_equal(np.asarray(code & 3), [[[2, 1, 0, 0], [0, 0, 0, 0], [1, 2, 0, 0]]])


def test_bad_ids_shape_is_reported():
    with pytest.raises(ValueError, match="doc_ids has shape"):
        bm.make_segments(2, 8, doc_ids=jnp.ones((2, 9), jnp.int32))
