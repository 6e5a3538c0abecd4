"""seqio Task/Mixture registration of the Grain data (the [seqio] extra)."""
import sys

import numpy as np
import pytest

from klong_jax.data import seqio_tasks
from klong_jax.data.context import ContextConfig
from klong_jax.data.packing import ROW_FIELDS
from klong_jax.data.pipeline import DataConfig, make_rows
from klong_jax.data.synthetic import build_tokenizers, synthetic_corpus
from klong_jax.data.trajectory import write_jsonl


def _config(tmp_path):
    build_tokenizers(str(tmp_path))
    write_jsonl(str(tmp_path / "a.jsonl"), synthetic_corpus(6, seed=1, turns=(2, 10)))
    return DataConfig(tokenizer=str(tmp_path / "sp.model"), paths=(str(tmp_path / "a.jsonl"),),
                      context=ContextConfig(budget_tokens=512, reserve_tokens=80), seq_len=512,
                      batch_size=1, shuffle=False, shard_index=0, shard_count=1)


def test_without_seqio_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "seqio", None)    # as if the extra were not installed
    with pytest.raises(ImportError, match=r"\[seqio\] extra"):
        seqio_tasks.register_task("klong_missing", _config(tmp_path))


def test_task_and_mixture_give_the_grain_rows(tmp_path):
    seqio = pytest.importorskip("seqio")
    cfg = _config(tmp_path)
    seqio_tasks.register_task("klong_test_sft", cfg)
    task = seqio.get_mixture_or_task("klong_test_sft")
    rows = list(task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator())
    expected = list(make_rows(cfg))
    assert len(rows) == len(expected) > 0
    for got, want in zip(rows, expected):
        for name in ROW_FIELDS:
            np.testing.assert_array_equal(got[name], want[name])
    seqio_tasks.register_mixture("klong_test_mix", [("klong_test_sft", 1.0)])
    mix = seqio.get_mixture_or_task("klong_test_mix")
    first = next(mix.get_dataset(None, split="train", shuffle=False).as_numpy_iterator())
    assert set(ROW_FIELDS) <= set(first)
