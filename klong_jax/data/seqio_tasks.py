"""The same data as a seqio Task / Mixture (the `[seqio]` extra; seqio pulls TensorFlow).

    from klong_jax.data.seqio_tasks import register_task, register_mixture
    register_task("klong_sft", data_config)
    register_mixture("klong_mix", [("klong_sft", 1.0), ("other_task", 0.5)])
    ds = seqio.get_mixture_or_task("klong_sft").get_dataset(None, split="train", shuffle=False)

Each example is one packed row from the Grain pipeline (make_rows), with the row fields as int32
features; no seqio preprocessing or feature conversion is needed (use a pass-through converter).
seqio is imported lazily, so this module imports without it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from klong_jax.data.packing import ROW_FIELDS
from klong_jax.data.pipeline import DataConfig, make_rows
from klong_jax.data.tokenizer import load_tokenizer


def _seqio():
    try:
        import seqio
        import tensorflow as tf
    except ImportError as e:
        raise ImportError("seqio tasks need the [seqio] extra: pip install -e '.[seqio]' "
                          f"(seqio + TensorFlow); {e}") from None
    return seqio, tf


def register_task(name: str, config: DataConfig):
    """Registers (replacing any task of that name) a Task whose examples are packed rows."""
    seqio, tf = _seqio()
    vocab_size = load_tokenizer(config.tokenizer).vocab_size
    vocab = seqio.PassThroughVocabulary(size=vocab_size)
    features = {field: seqio.Feature(vocabulary=vocab, add_eos=False, dtype=tf.int32, rank=1)
                for field in ROW_FIELDS}
    seq_len = config.seq_len

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
        cfg = dataclasses.replace(config, split=split, shuffle=shuffle_files,
                                  seed=config.seed if seed is None else int(seed))

        def rows():
            for row in make_rows(cfg):
                yield {field: row[field] for field in ROW_FIELDS}

        signature = {field: tf.TensorSpec([seq_len], tf.int32) for field in ROW_FIELDS}
        return tf.data.Dataset.from_generator(rows, output_signature=signature)

    source = seqio.FunctionDataSource(dataset_fn=dataset_fn, splits=[config.split])
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(name, source=source, preprocessors=[], output_features=features)


def register_mixture(name: str, tasks: Sequence[tuple[str, float]]):
    """A Mixture of registered tasks with sampling rates."""
    seqio, _ = _seqio()
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, list(tasks))
