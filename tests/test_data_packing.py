"""Packing: the attention mask built from doc/window ids gives every packed token exactly the context
it has in its unpacked window (brute force, token by token); positions, targets and loss agree."""
from collections import Counter, defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernels.reference import attention_mask, reference_attention
from klong_jax.data.chat_template import Glm45Template
from klong_jax.data.context import ContextConfig, ContextPolicy
from klong_jax.data.packing import best_fit_decreasing, pack_trajectories
from klong_jax.data.splitting import split
from klong_jax.data.synthetic import build_tokenizers, synthetic_corpus

SEQ_LEN = 1024


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = build_tokenizers(str(tmp_path_factory.mktemp("tok")))["sp"]
    policy = ContextPolicy(Glm45Template(tok), ContextConfig(budget_tokens=640, reserve_tokens=100))
    corpus = synthetic_corpus(6, seed=3, turns=(2, 25), prefix_words=150, p_long_tool=0.05,
                              long_tool_words=600)
    windows = [split(t, policy) for t in corpus]
    assert sum(len(w) > 1 for w in windows) >= 3
    return tok, windows


def _unpack(row, pad_id):
    """Reconstructs every window of a row: {(doc, window): packed indices in window order}."""
    groups = defaultdict(list)
    for i, (d, w) in enumerate(zip(row["doc_ids"], row["window_ids"])):
        if d:
            groups[(int(d), int(w))].append(i)
    out = {}
    for (d, w), idx in groups.items():
        if w:
            out[(d, w)] = groups[(d, 0)] + idx
    return out


@pytest.mark.parametrize("mode", ["shared_prefix", "standard"])
def test_packed_mask_equals_unpacked_windows(setup, mode):
    tok, windows = setup
    rows, stats = pack_trajectories(windows, SEQ_LEN, mode=mode, pad_id=tok.pad_id)
    wanted = Counter(tuple(w.input_ids.tolist()) for ws in windows for w in ws)
    by_ids = {tuple(w.input_ids.tolist()): w for ws in windows for w in ws}
    found = Counter()
    for row in rows:
        mask = np.asarray(attention_mask(jnp.asarray(row["doc_ids"])[None],
                                         jnp.asarray(row["window_ids"])[None], SEQ_LEN, SEQ_LEN))[0]
        assert not mask[row["doc_ids"] == 0].any() and not mask[:, row["doc_ids"] == 0].any()
        assert (row["loss_mask"][row["doc_ids"] == 0] == 0).all()
        for (d, k), idx in _unpack(row, tok.pad_id).items():
            ids = tuple(row["input_ids"][idx].tolist())
            w = by_ids[ids]
            found[ids] += 1
            # Positions: those of the unpacked window.
            assert row["positions"][idx].tolist() == list(range(len(w)))
            # Brute-force mask: token at unpacked position p sees exactly positions 0..p.
            where = {packed: p for p, packed in enumerate(idx)}
            for p, q in enumerate(idx):
                seen = np.flatnonzero(mask[q])
                same_doc_ok = all(k2 in where or row["doc_ids"][k2] != d for k2 in seen)
                assert same_doc_ok, "a token sees another document"
                assert sorted(where[k2] for k2 in seen if k2 in where) == list(range(p + 1))
                assert len(seen) == p + 1, "a token sees a token outside its window"
            # Targets and loss: those of the unpacked window. The prefix's last token is shared by
            # the doc's windows and carries no loss; its target is the first window's.
            body = idx[w.prefix_len:]
            assert row["targets"][body].tolist() == w.targets[w.prefix_len:].tolist()
            assert row["loss_mask"][idx].tolist() == w.loss_mask.tolist()
            assert row["targets"][idx[:w.prefix_len - 1]].tolist() == \
                w.targets[:w.prefix_len - 1].tolist()
            # A window's last token has no target, even when another window follows in the row.
            assert row["targets"][idx[-1]] == tok.pad_id and row["loss_mask"][idx[-1]] == 0
    assert found == wanted
    assert stats.windows == sum(wanted.values())
    assert stats.real_tokens == int((np.stack([r["doc_ids"] for r in rows]) > 0).sum())
    assert stats.efficiency == stats.real_tokens / (len(rows) * SEQ_LEN)


def test_shared_prefix_saves_prefix_tokens(setup):
    tok, windows = setup
    _, shared = pack_trajectories(windows, SEQ_LEN, mode="shared_prefix", pad_id=tok.pad_id)
    _, standard = pack_trajectories(windows, SEQ_LEN, mode="standard", pad_id=tok.pad_id)
    assert standard.prefix_tokens_saved == 0 and shared.prefix_tokens_saved > 0
    assert shared.real_tokens + shared.prefix_tokens_saved == standard.real_tokens
    assert shared.rows <= standard.rows


def test_attention_output_equals_unpacked(setup):
    """With the reference attention kernel: embeddings of (token, position) through one attention
    layer give the same output per token packed and unpacked."""
    tok, windows = setup
    rows, _ = pack_trajectories(windows[:3], SEQ_LEN, mode="shared_prefix", pad_id=tok.pad_id)
    key = jax.random.PRNGKey(0)
    tok_emb = jax.random.normal(key, (tok.vocab_size, 2, 8))
    pos_emb = jax.random.normal(jax.random.fold_in(key, 1), (SEQ_LEN, 2, 8))

    @jax.jit
    def attend(ids, pos, doc, win):   # all [SEQ_LEN]: one compilation for rows and windows
        x = tok_emb[ids] + pos_emb[pos]
        return reference_attention(x[None], x[None], x[None], doc_ids=doc[None],
                                   window_ids=win[None])[0]

    def padded(a):
        out = np.zeros(SEQ_LEN, np.int32)
        out[:len(a)] = a
        return out

    by_ids = {tuple(w.input_ids.tolist()): w for ws in windows[:3] for w in ws}
    n_checked = 0
    for row in rows:
        packed = np.asarray(attend(row["input_ids"], row["positions"], row["doc_ids"],
                                   row["window_ids"]))
        for idx in _unpack(row, tok.pad_id).values():
            w = by_ids[tuple(row["input_ids"][idx].tolist())]
            alone = np.asarray(attend(padded(w.input_ids), padded(w.positions),
                                      padded(np.ones(len(w))), np.zeros(SEQ_LEN, np.int32)))
            np.testing.assert_allclose(packed[idx], alone[:len(w)], atol=1e-5)
            n_checked += 1
    assert n_checked == sum(len(ws) for ws in windows[:3])


@pytest.mark.parametrize("mode", ["shared_prefix", "standard"])
def test_extra_fields_travel_with_their_tokens(setup, mode):
    """Per-token extras (RL: advantages, sampler log-probs) land beside their tokens."""
    tok, windows = setup
    extras = [[{"turn_ids": w.turn_ids, "adv": np.full(len(w), 0.5 + t, np.float32)}
               for w in ws] for t, ws in enumerate(windows)]
    rows, _ = pack_trajectories(windows, SEQ_LEN, mode=mode, pad_id=tok.pad_id,
                                extras_per_trajectory=extras)
    by_ids = {tuple(w.input_ids.tolist()): (t, w) for t, ws in enumerate(windows) for w in ws}
    for row in rows:
        assert row["adv"].dtype == np.float32 and (row["adv"][row["doc_ids"] == 0] == 0).all()
        for idx in _unpack(row, tok.pad_id).values():
            t, w = by_ids[tuple(row["input_ids"][idx].tolist())]
            assert row["turn_ids"][idx].tolist() == w.turn_ids.tolist()
            assert (row["adv"][idx] == 0.5 + t).all()
    with pytest.raises(ValueError, match="one value per window token"):
        pack_trajectories(windows[:1], SEQ_LEN, extras_per_trajectory=[[{"adv": np.zeros(3)}] * len(
            windows[0])])


def test_window_longer_than_row_is_an_error(setup):
    tok, windows = setup
    with pytest.raises(ValueError, match="does not fit a row"):
        pack_trajectories(windows, 200, mode="standard", pad_id=tok.pad_id)


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(1, 100), max_size=60), capacity=st.integers(100, 300))
def test_best_fit_decreasing(sizes, capacity):
    bins = best_fit_decreasing(sizes, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in b) for b in bins]
    assert all(0 < load <= capacity for load in loads)
    assert len(bins) >= -(-sum(sizes) // capacity)
    assert sum(2 * load <= capacity for load in loads) <= 1
