"""Packing windows into fixed-length rows: standard, and shared-prefix (one prefix, many windows).

A row holds documents; per token:
  doc_ids     1..n for the row's documents, 0 = padding
  window_ids  0 = the document's shared prefix, k >= 1 = its k-th window
  positions   prefix 0..P-1; each window's own tokens continue at P.. as if it stood alone after
              the prefix
  targets, loss_mask   those of the unpacked window (computed per window, never across a boundary)
Token q sees token k iff doc[q] == doc[k] != 0, k <= q, and (win[k] == 0 or win[k] == win[q])
(kernels.reference.attention_mask), which is exactly what q sees in its unpacked window.

Extra per-token fields of a window (RL advantages, sampler log-probs) can ride along: they are
placed beside their tokens (the shared prefix takes the first window's) and padded with 0.

Shared-prefix mode puts the windows of one trajectory after a single copy of their common prefix
(several copies when they do not fit one row); standard mode makes every window its own document.
Documents go into rows by best-fit decreasing.
"""
from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from klong_jax.data.splitting import Window

PACK_MODES = ("shared_prefix", "standard")
ROW_FIELDS = ("input_ids", "targets", "loss_mask", "positions", "doc_ids", "window_ids")
_WINDOW_FIELDS = ("input_ids", "targets", "loss_mask", "positions")


@dataclass(frozen=True)
class PackDoc:
    """One document of a row: a prefix and the windows sharing it, laid out token by token.
    `arrays` holds input_ids, targets, loss_mask, positions, window_ids and any extra fields."""
    arrays: dict[str, np.ndarray]
    n_windows: int
    prefix_tokens_saved: int

    def __len__(self) -> int:
        return int(self.arrays["input_ids"].shape[0])


@dataclass
class PackStats:
    rows: int = 0
    docs: int = 0
    windows: int = 0
    real_tokens: int = 0          # tokens placed in rows (not padding)
    row_tokens: int = 0           # rows * seq_len
    prefix_tokens_saved: int = 0  # prefix tokens not repeated thanks to sharing

    @property
    def efficiency(self) -> float:
        return self.real_tokens / self.row_tokens if self.row_tokens else 0.0

    def add(self, other: PackStats) -> None:
        for name in ("rows", "docs", "windows", "real_tokens", "row_tokens", "prefix_tokens_saved"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict:
        return {"rows": self.rows, "docs": self.docs, "windows": self.windows,
                "real_tokens": self.real_tokens, "row_tokens": self.row_tokens,
                "prefix_tokens_saved": self.prefix_tokens_saved,
                "efficiency": round(self.efficiency, 4)}


def best_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each summing to <= capacity: largest item first, into the bin it fills
    most tightly. Deterministic (ties by index)."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []    # sorted (remaining space, bin index)
    for i in order:
        if sizes[i] > capacity:
            raise ValueError(f"item of {sizes[i]} tokens does not fit a row of {capacity}")
        at = bisect.bisect_left(free, (sizes[i], -1))
        if at < len(free):
            remaining, b = free.pop(at)
        else:
            remaining, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if remaining - sizes[i] > 0:
            bisect.insort(free, (remaining - sizes[i], b))
    return bins


Extras = Mapping[str, np.ndarray]   # extra per-token fields of one window (e.g. RL advantages)


def _window_arrays(window: Window, extras: Extras | None) -> dict[str, np.ndarray]:
    arrays = {name: getattr(window, name) for name in _WINDOW_FIELDS}
    for name, values in (extras or {}).items():
        if name in ROW_FIELDS or values.shape[:1] != (len(window),):
            raise ValueError(f"extra field {name!r}: a new name with one value per window token "
                             f"({len(window)}), got shape {values.shape}")
        arrays[name] = values
    return arrays


def standalone_doc(window: Window, extras: Extras | None = None) -> PackDoc:
    """One window as its own document (window id 0 on its prefix part, 1 on the rest)."""
    arrays = _window_arrays(window, extras)
    arrays["window_ids"] = np.ones(len(window), np.int32)
    arrays["window_ids"][:window.prefix_len] = 0
    return PackDoc(arrays, 1, 0)


def shared_prefix_docs(windows: Sequence[Window], seq_len: int,
                       extras: Sequence[Extras] | None = None) -> list[PackDoc]:
    """The windows of one trajectory, grouped behind as few copies of their prefix as fit. The
    prefix's targets and extras are those of the group's first window (the prefix carries no loss)."""
    if not windows:
        return []
    P = windows[0].prefix_len
    prefix = windows[0].input_ids[:P]
    for w in windows:
        if w.prefix_len != P or not np.array_equal(w.input_ids[:P], prefix):
            raise ValueError(f"window {w.index} does not share the prefix of window 0")
        if w.loss_mask[:P].any():
            raise ValueError(f"window {w.index} has loss on its prefix: it cannot be shared")
    per_window = [_window_arrays(w, extras[i] if extras else None) for i, w in enumerate(windows)]
    groups = best_fit_decreasing([len(w) - P for w in windows], seq_len - P)
    docs = []
    for group in groups:
        members = sorted(group)
        parts = {name: [a[:P]] for name, a in per_window[members[0]].items()}
        parts["window_ids"] = [np.zeros(P, np.int32)]
        for k, i in enumerate(members, start=1):
            for name, a in per_window[i].items():
                parts[name].append(a[P:])
            parts["window_ids"].append(np.full(len(windows[i]) - P, k, np.int32))
        docs.append(PackDoc({n: np.concatenate(p) for n, p in parts.items()}, len(members),
                            (len(members) - 1) * P))
    return docs


def make_docs(trajectory_windows: Sequence[Window], seq_len: int, mode: str,
              extras: Sequence[Extras] | None = None) -> list[PackDoc]:
    """Documents of one trajectory's windows; `extras[k]` are extra fields of window k."""
    if extras is not None and len(extras) != len(trajectory_windows):
        raise ValueError(f"{len(extras)} extras for {len(trajectory_windows)} windows")
    if mode == "shared_prefix":
        return shared_prefix_docs(trajectory_windows, seq_len, extras)
    if mode == "standard":
        return [standalone_doc(w, extras[k] if extras else None)
                for k, w in enumerate(trajectory_windows)]
    raise ValueError(f"packing={mode!r}; choose one of {PACK_MODES}")


def assemble_row(docs: Sequence[PackDoc], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One row: the documents one after another, then padding (doc id 0, no loss, pad ids, zero
    extras)."""
    names = dict.fromkeys(ROW_FIELDS)
    for doc in docs:
        names.update(dict.fromkeys(doc.arrays))
    row = {}
    for name in names:
        like = next((d.arrays[name] for d in docs if name in d.arrays), None)
        dtype = like.dtype if like is not None else np.int32
        trailing = like.shape[1:] if like is not None else ()   # extras may be [T, ...] (e.g. routing)
        row[name] = np.full((seq_len,) + trailing, pad_id if name in ("input_ids", "targets") else 0, dtype)
    at = 0
    for d, doc in enumerate(docs, start=1):
        end = at + len(doc)
        for name, values in doc.arrays.items():
            row[name][at:end] = values
        row["doc_ids"][at:end] = d
        at = end
    return row


def pack_docs(docs: Sequence[PackDoc], seq_len: int, pad_id: int
              ) -> tuple[list[dict[str, np.ndarray]], PackStats]:
    """Rows of [seq_len] arrays (ROW_FIELDS), best-fit decreasing; and what it cost."""
    bins = best_fit_decreasing([len(d) for d in docs], seq_len)
    rows = [assemble_row([docs[i] for i in sorted(b)], seq_len, pad_id) for b in bins]
    stats = PackStats(rows=len(rows), docs=len(docs), windows=sum(d.n_windows for d in docs),
                      real_tokens=sum(len(d) for d in docs), row_tokens=len(rows) * seq_len,
                      prefix_tokens_saved=sum(d.prefix_tokens_saved for d in docs))
    return rows, stats


def pack_trajectories(windows_per_trajectory: Sequence[Sequence[Window]], seq_len: int, *,
                      mode: str = "shared_prefix", pad_id: int = 0,
                      extras_per_trajectory: Sequence[Sequence[Extras]] | None = None
                      ) -> tuple[list[dict[str, np.ndarray]], PackStats]:
    docs = []
    for t, windows in enumerate(windows_per_trajectory):
        extras = extras_per_trajectory[t] if extras_per_trajectory is not None else None
        docs += make_docs(windows, seq_len, mode, extras)
    return pack_docs(docs, seq_len, pad_id)
