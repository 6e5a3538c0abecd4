"""Consistent renaming of a trajectory's names: a data augmentation that makes copying the only way to be right.

A trajectory's names (directories, files, values that the task spec gives) appear in the spec, in the agent's
reasoning, in its commands and in tool outputs. With probability `prob`, `RenameWords` draws one random
permutation of a fixed word list per trajectory and applies it to every token of every window: the spec,
the calls and the outputs all say `lamp` where the original said `wheel`, so the trajectory stays a correct
solution of a renamed task. A model can then lower its loss on a name only by finding it in its context;
guessing from how often each name occurs in training (what a small model learns first) stops paying.

Works on token ids, so every word must be one id of the tokenizer (the embedded suite's tokenizer makes each
task word an atomic symbol); `word_ids` says which words are not.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from klong_jax.data.tokenizer import Tokenizer


def word_ids(tokenizer: Tokenizer, words: Sequence[str]) -> np.ndarray:
    """The single id of each word; a clear error lists the words the tokenizer splits or does not know."""
    ids, bad = [], []
    for word in words:
        found = [i for i in tokenizer.encode(word) if tokenizer.decode([i]).strip() == word]
        if len(found) == 1:
            ids.append(found[0])
        else:
            bad.append(word)
    if bad:
        raise ValueError(f"renaming needs each word to be one token of {tokenizer!r}; these are not: {bad[:20]}"
                         f"{' ...' if len(bad) > 20 else ''} (train the tokenizer with them as atomic words)")
    if len(set(ids)) != len(ids):
        raise ValueError("renaming words must be distinct")
    return np.asarray(ids, np.int64)


class RenameWords:
    """grain random map on split records (objects with a `windows` list of splitting.Window)."""

    def __init__(self, ids: np.ndarray, vocab_size: int, prob: float):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"rename_prob={prob} must be in [0, 1]")
        if ids.size and ids.max() >= vocab_size:
            raise ValueError(f"renaming word id {int(ids.max())} >= vocab size {vocab_size}")
        self.ids = ids
        self.vocab_size = vocab_size
        self.prob = prob

    def table(self, rng: np.random.Generator) -> np.ndarray:
        """An id -> id lookup table that permutes the words and leaves every other id alone."""
        table = np.arange(self.vocab_size, dtype=np.int32)
        table[self.ids] = self.ids[rng.permutation(self.ids.size)]
        return table

    def __call__(self, record, rng: np.random.Generator):
        windows = getattr(record, "windows", None)
        if windows is None or rng.random() >= self.prob:   # skipped records pass through
            return record
        table = self.table(rng)
        renamed = [dataclasses.replace(w, input_ids=table[w.input_ids], targets=table[w.targets]) for w in windows]
        return dataclasses.replace(record, windows=renamed)
