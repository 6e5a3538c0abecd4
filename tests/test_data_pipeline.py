"""Grain pipeline: JSONL and ArrayRecord (TFDS) sources, seeded shuffle, sharding, errors, packing,
batching, worker processes, and exact resume from a checkpointed iterator state."""
import json

import ml_collections
import numpy as np
import pytest

from klong_jax.data.chat_template import Glm45Template
from klong_jax.data.context import ContextConfig, ContextPolicy
from klong_jax.data.pipeline import DataConfig, make_dataset, make_rows
from klong_jax.data.packing import ROW_FIELDS
from klong_jax.data.sources import JsonlSource
from klong_jax.data.splitting import split
from klong_jax.data.synthetic import build_tokenizers, synthetic_corpus
from klong_jax.data.tokenizer import SentencePieceTokenizer
from klong_jax.data.trajectory import TrajectoryError, write_jsonl

CONTEXT = ContextConfig(budget_tokens=512, reserve_tokens=80)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    build_tokenizers(str(d))
    corpus = synthetic_corpus(24, seed=7, turns=(2, 16), prefix_words=100)
    write_jsonl(str(d / "a.jsonl"), corpus[:12])
    write_jsonl(str(d / "b.jsonl"), corpus[12:])
    return d, corpus


def _config(d, **kw):
    base = dict(tokenizer=str(d / "sp.model"), context=CONTEXT, seq_len=1024, batch_size=2,
                paths=(str(d / "*.jsonl"),), shard_index=0, shard_count=1, pack_chunk=8)
    base.update(kw)
    return DataConfig(**base)


def _batches(cfg, n=None):
    it = iter(make_dataset(cfg))
    return [b for _, b in zip(range(n) if n is not None else iter(int, 1), it)]


def _expected_loss_tokens(d, corpus):
    tok_policy = ContextPolicy(Glm45Template(SentencePieceTokenizer(str(d / "sp.model"))), CONTEXT)
    return sum(int(w.loss_mask.sum()) for t in corpus for w in split(t, tok_policy))


def test_batches_hold_every_trajectory(data):
    d, corpus = data
    batches = _batches(_config(d, drop_remainder=False))
    for b in batches:
        assert set(b) == set(ROW_FIELDS)
        for name in ROW_FIELDS:
            assert b[name].dtype == np.int32 and b[name].shape[1] == 1024
        assert (b["loss_mask"][b["doc_ids"] == 0] == 0).all()
    assert sum(int(b["loss_mask"].sum()) for b in batches) == _expected_loss_tokens(d, corpus)


def test_chat_template_is_configurable(data, tmp_path):
    """data.chat_template picks the template the windows are rendered with: ChatML with a ChatML tokenizer (the
    same loss tokens as splitting by hand), and a name that does not fit the tokenizer is an error."""
    from klong_jax.data.chat_template import ChatMLTemplate
    from tokenizer_helpers import chatml_tokenizer
    d, corpus = data
    tok = chatml_tokenizer(str(tmp_path))
    cfg = _config(d, tokenizer=tok._path, chat_template="chatml", drop_remainder=False)
    batches = _batches(cfg)
    expected = sum(int(w.loss_mask.sum()) for t in corpus for w in split(t, ContextPolicy(ChatMLTemplate(tok),
                                                                                       CONTEXT)))
    assert sum(int(b["loss_mask"].sum()) for b in batches) == expected
    first = batches[0]["input_ids"][0]
    assert tok.decode(first[:20]).startswith("<|im_start|>system\nYou are a research agent.")
    assert sum(int(b["loss_mask"].sum()) for b in _batches(_config(d, tokenizer=tok._path, drop_remainder=False))) \
        == expected                                   # "auto" finds ChatML's tokens
    with pytest.raises(ValueError, match=r"no special token\(s\) \['\[gMASK\]'"):
        _batches(_config(d, tokenizer=tok._path, chat_template="glm45"), 1)


def test_keep_reasoning_false_trains_on_the_trajectories_without_reasoning(data):
    """keep_reasoning=False: the loss tokens are exactly those of the corpus with every reasoning removed (split
    by hand), and fewer than with it."""
    from klong_jax.data.trajectory import without_reasoning
    d, corpus = data
    stripped = [without_reasoning(t) for t in corpus]
    assert sum(m.reasoning is not None for t in corpus for m in t.messages) > 0          # the corpus has some
    assert all(m.reasoning is None for t in stripped for m in t.messages)
    assert [[(m.role, m.content, m.tool_calls) for m in t.messages] for t in stripped] == \
        [[(m.role, m.content, m.tool_calls) for m in t.messages] for t in corpus]      # nothing else changes
    batches = _batches(_config(d, drop_remainder=False, keep_reasoning=False))
    loss_tokens = sum(int(b["loss_mask"].sum()) for b in batches)
    assert loss_tokens == _expected_loss_tokens(d, stripped) < _expected_loss_tokens(d, corpus)


def test_seeded_shuffle_is_deterministic(data):
    d, _ = data
    a, b = _batches(_config(d, seed=1), 3), _batches(_config(d, seed=1), 3)
    c = _batches(_config(d, seed=2), 3)
    for x, y in zip(a, b):
        assert all(np.array_equal(x[k], y[k]) for k in ROW_FIELDS)
    assert not all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


@pytest.mark.parametrize("taken", [0, 1, 4, 9])
def test_resume_gives_exactly_the_next_batches(data, taken):
    d, _ = data
    cfg = _config(d, seed=3, num_epochs=2)
    it = iter(make_dataset(cfg))
    for _ in range(taken):
        next(it)
    state = json.loads(json.dumps(it.get_state()))   # checkpoints store it as JSON
    rest = list(it)
    resumed = iter(make_dataset(cfg))
    resumed.set_state(state)
    again = list(resumed)
    assert len(again) == len(rest) > 0
    for x, y in zip(rest, again):
        assert all(np.array_equal(x[k], y[k]) for k in ROW_FIELDS)


def _prefixes(batches):
    out = set()
    for b in batches:
        for row in range(b["doc_ids"].shape[0]):
            for doc in set(b["doc_ids"][row].tolist()) - {0}:
                sel = (b["doc_ids"][row] == doc) & (b["window_ids"][row] == 0)
                out.add(tuple(b["input_ids"][row][sel].tolist()))
    return out


def test_shards_split_the_data(data):
    d, corpus = data
    shards = [_batches(_config(d, shard_index=i, shard_count=2, drop_remainder=False))
              for i in range(2)]
    p0, p1 = _prefixes(shards[0]), _prefixes(shards[1])
    assert p0 and p1 and not p0 & p1
    assert p0 | p1 == _prefixes(_batches(_config(d, drop_remainder=False)))
    assert sum(int(b["loss_mask"].sum()) for s in shards for b in s) == \
        _expected_loss_tokens(d, corpus)
    with pytest.raises(ValueError, match="give both shard_index and shard_count"):
        make_dataset(_config(d, shard_index=None, shard_count=2))


@pytest.fixture(scope="module")
def bad_file(data):
    d, corpus = data
    lines = [c.to_json() for c in corpus[:4]]
    lines.insert(1, lines[0][:-30])                                       # truncated
    orphan = corpus[4].to_dict()
    orphan["messages"][3]["tool_call_id"] = "nobody"                       # orphan tool result
    lines.insert(3, json.dumps(orphan))
    huge = corpus[5].to_dict()
    huge["messages"][1]["content"] = "paper " * 2000                       # prefix over budget
    lines.append(json.dumps(huge))
    path = d / "bad" / "bad.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_file_raises_with_line_and_field(data, bad_file):
    d, _ = data
    with pytest.raises(TrajectoryError, match=r"bad\.jsonl:2: invalid JSON .*truncated"):
        list(iter(make_rows(_config(d, paths=(str(bad_file),), shuffle=False))))
    got = []
    with pytest.raises(TrajectoryError, match=r"bad\.jsonl:2"):
        for row in make_rows(_config(d, paths=(str(bad_file),), shuffle=False, pack_chunk=1)):
            got.append(row)
    assert got, "line 1 is delivered before line 2 fails"


def test_malformed_file_skip_counts_and_logs(data, bad_file, caplog):
    d, corpus = data
    with caplog.at_level("WARNING"):
        it = iter(make_rows(_config(d, paths=(str(bad_file),), on_error="skip")))
        rows = list(it)
    assert it.counters.skipped == 3 and it.counters.trajectories == 4
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "bad.jsonl:2" in logged and "bad.jsonl:4" in logged and "bad.jsonl:7" in logged
    assert "messages[3].tool_call_id" in logged and "the prefix has" in logged
    assert sum(int(r["loss_mask"].sum()) for r in rows) == _expected_loss_tokens(d, corpus[:4])


def test_tfds_array_record_source(data, tmp_path):
    from klong_jax.data.tfds_source import TfdsRecordSource, build
    d, corpus = data
    build([str(d / "a.jsonl"), str(d / "b.jsonl")], str(tmp_path))
    records = TfdsRecordSource(str(tmp_path))
    jsonl = JsonlSource([str(d / "a.jsonl"), str(d / "b.jsonl")])
    as_set = lambda src: {(r.source, r.line, r.data.rstrip(b"\n")) for r in (src[i] for i in
                                                                           range(len(src)))}
    assert len(records) == 24 and as_set(records) == as_set(jsonl)
    cfg = _config(d, source="tfds", paths=(), tfds_data_dir=str(tmp_path), drop_remainder=False)
    batches = _batches(cfg)
    assert sum(int(b["loss_mask"].sum()) for b in batches) == _expected_loss_tokens(d, corpus)


def test_tfds_builder_skips_invalid_lines(data, bad_file, tmp_path):
    from klong_jax.data.tfds_source import build
    with pytest.raises(TrajectoryError, match=r"bad\.jsonl:2"):
        build(str(bad_file), str(tmp_path / "strict"))
    builder = build(str(bad_file), str(tmp_path / "lenient"), on_error="skip")
    assert builder.skip_stats.skipped == 2           # the prefix overflow is the policy's to judge
    assert builder.info.splits["train"].num_examples == 5


def test_worker_processes(data):
    d, corpus = data
    cfg = _config(d, num_workers=2, drop_remainder=False, seed=4)
    it = iter(make_dataset(cfg))
    first = [next(it) for _ in range(2)]
    state = it.get_state()
    rest = list(it)
    it.close()
    total = sum(int(b["loss_mask"].sum()) for b in first + rest)
    assert total == _expected_loss_tokens(d, corpus)
    resumed = iter(make_dataset(cfg))
    resumed.set_state(state)
    again = list(resumed)
    resumed.close()
    assert len(again) == len(rest)
    for x, y in zip(rest, again):
        assert all(np.array_equal(x[k], y[k]) for k in ROW_FIELDS)


def test_config_checks(data):
    d, _ = data
    with pytest.raises(ValueError, match="seq_len=256 must be >= context.budget_tokens"):
        _config(d, seq_len=256)
    with pytest.raises(ValueError, match="packing"):
        _config(d, packing="greedy")
    cd = ml_collections.ConfigDict(dict(tokenizer="t.model", seq_len=2048, batch_size=4,
                                        paths="a.jsonl,b.jsonl", context=dict(budget_tokens=2048)))
    cfg = DataConfig.from_mapping(cd)
    assert cfg.paths == ("a.jsonl", "b.jsonl") and cfg.context.budget_tokens == 2048
    with pytest.raises(ValueError, match="unknown data config key"):
        DataConfig.from_mapping({**cd.to_dict(), "batchsize": 3})
