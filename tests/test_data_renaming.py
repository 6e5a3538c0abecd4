"""Word renaming (data/renaming.py): one consistent permutation per trajectory, over the listed words only."""
import dataclasses

import numpy as np
import pytest

from klong_jax.data.chat_template import Glm45Template
from klong_jax.data.context import ContextConfig, ContextPolicy
from klong_jax.data.pipeline import DataConfig, make_dataset
from klong_jax.data.renaming import RenameWords, word_ids
from klong_jax.data.splitting import split
from klong_jax.data.synthetic import WORDS, build_tokenizers, synthetic_corpus
from klong_jax.data.tokenizer import SentencePieceTokenizer
from klong_jax.data.trajectory import write_jsonl

CONTEXT = ContextConfig(budget_tokens=512, reserve_tokens=80)


@dataclasses.dataclass(frozen=True)
class _Record:
    windows: list


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("renaming")
    build_tokenizers(str(d))
    corpus = synthetic_corpus(6, seed=3, turns=(6, 12), prefix_words=60, tool_words=(5, 30))
    write_jsonl(str(d / "a.jsonl"), corpus)
    tok = SentencePieceTokenizer(str(d / "sp.model"))
    words = [w for w in WORDS if len([i for i in tok.encode(w) if tok.decode([i]).strip() == w]) == 1][:8]
    assert len(words) >= 4, "the synthetic tokenizer should have whole-word pieces"
    return d, corpus, tok, tuple(words)


def test_one_permutation_per_trajectory_over_the_words_only(data):
    _, corpus, tok, words = data
    ids = word_ids(tok, words)
    windows = split(corpus[0], ContextPolicy(Glm45Template(tok), CONTEXT))
    assert len(windows) > 1 and np.isin(np.concatenate([w.input_ids for w in windows]), ids).any()
    rename = RenameWords(ids, tok.vocab_size, prob=1.0)
    renamed = rename(_Record(windows), np.random.default_rng(0)).windows
    mapping = {}
    for before, after in zip(windows, renamed):
        for field in ("input_ids", "targets"):
            a, b = getattr(before, field), getattr(after, field)
            other = ~np.isin(a, ids)
            np.testing.assert_array_equal(a[other], b[other])        # every other token is untouched
            assert np.isin(b[~other], ids).all()                      # words become words
            for x, y in zip(a[~other], b[~other]):
                assert mapping.setdefault(int(x), int(y)) == int(y)   # the same renaming in every window
        np.testing.assert_array_equal(after.loss_mask, before.loss_mask)
        np.testing.assert_array_equal(after.targets[:-1], after.input_ids[1:])
    assert len(set(mapping.values())) == len(mapping)                 # a bijection
    # Another draw renames differently; prob 0 leaves the record as it was.
    other = RenameWords(ids, tok.vocab_size, prob=1.0)(_Record(windows), np.random.default_rng(1)).windows
    assert any(not np.array_equal(a.input_ids, b.input_ids) for a, b in zip(renamed, other))
    same = RenameWords(ids, tok.vocab_size, prob=0.0)(_Record(windows), np.random.default_rng(0)).windows
    assert all(a is b for a, b in zip(windows, same))


def test_words_that_are_not_one_token_are_named(data):
    _, _, tok, words = data
    with pytest.raises(ValueError, match="zqxjv"):
        word_ids(tok, words + ("zqxjv",))
    with pytest.raises(ValueError, match="needs data.pipeline.rename_words"):
        DataConfig(tokenizer="x", context=CONTEXT, seq_len=512, batch_size=1, rename_prob=0.5)


def test_pipeline_renames_seeded_and_keeps_layout(data):
    d, _, _, words = data

    def batches(prob, seed=0):
        cfg = DataConfig(tokenizer=str(d / "sp.model"), context=CONTEXT, seq_len=1024, batch_size=2,
                         paths=(str(d / "a.jsonl"),), shard_index=0, shard_count=1, seed=seed,
                         rename_words=words, rename_prob=prob, drop_remainder=False)
        return list(make_dataset(cfg))

    plain, renamed, again = batches(0.0), batches(1.0), batches(1.0)
    assert len(plain) == len(renamed)
    changed = False
    for p, r, a in zip(plain, renamed, again):
        for k in p:
            np.testing.assert_array_equal(r[k], a[k])                 # seeded: the same run renames the same
            if k not in ("input_ids", "targets"):
                np.testing.assert_array_equal(p[k], r[k])             # positions, masks, docs unchanged
        changed |= not np.array_equal(p["input_ids"], r["input_ids"])
    assert changed
