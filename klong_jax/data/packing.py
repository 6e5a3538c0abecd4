"""Packing windows into fixed-length rows: standard, and shared-prefix (one prefix, many windows).

A row holds documents; per token:
  doc_ids     1..n for the row's documents, 0 = padding
  window_ids  0 = the document's shared prefix, k >= 1 = its k-th window
  positions   prefix 0..P-1; each window's own tokens continue at P.. as if it stood alone after
              the prefix
  targets, loss_mask   those of the unpacked window (computed per window, never across a boundary)
Token q sees token k iff doc[q] == doc[k] != 0, k <= q, and (win[k] == 0 or win[k] == win[q])
(kernels.reference.attention_mask), which is exactly what q sees in its unpacked window.

Shared-prefix mode puts the windows of one trajectory after a single copy of their common prefix
(several copies when they do not fit one row); standard mode makes every window its own document.
Documents go into rows by best-fit decreasing.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from klong_jax.data.splitting import Window

PACK_MODES = ("shared_prefix", "standard")
ROW_FIELDS = ("input_ids", "targets", "loss_mask", "positions", "doc_ids", "window_ids")


@dataclass(frozen=True)
class PackDoc:
    """One document of a row: a prefix and the windows that share it, laid out token by token."""
    input_ids: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    positions: np.ndarray
    window_ids: np.ndarray
    n_windows: int
    prefix_tokens_saved: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


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


def standalone_doc(window: Window) -> PackDoc:
    """One window as its own document (window id 0 on its prefix part, 1 on the rest)."""
    window_ids = np.ones(len(window), np.int32)
    window_ids[:window.prefix_len] = 0
    return PackDoc(window.input_ids, window.targets, window.loss_mask, window.positions,
                   window_ids, 1, 0)


def shared_prefix_docs(windows: Sequence[Window], seq_len: int) -> list[PackDoc]:
    """The windows of one trajectory, grouped behind as few copies of their prefix as fit."""
    if not windows:
        return []
    P = windows[0].prefix_len
    prefix = windows[0].input_ids[:P]
    for w in windows:
        if w.prefix_len != P or not np.array_equal(w.input_ids[:P], prefix):
            raise ValueError(f"window {w.index} does not share the prefix of window 0")
        if w.loss_mask[:P].any():
            raise ValueError(f"window {w.index} has loss on its prefix: it cannot be shared")
    groups = best_fit_decreasing([len(w) - P for w in windows], seq_len - P)
    docs = []
    for group in groups:
        members = [windows[i] for i in sorted(group)]
        first = members[0]
        parts = {name: [getattr(first, name)[:P]] for name in ("input_ids", "targets", "loss_mask",
                                                                 "positions")}
        window_ids = [np.zeros(P, np.int32)]
        for k, w in enumerate(members, start=1):
            for name in parts:
                parts[name].append(getattr(w, name)[P:])
            window_ids.append(np.full(len(w) - P, k, np.int32))
        docs.append(PackDoc(*(np.concatenate(parts[n]) for n in parts), np.concatenate(window_ids),
                            len(members), (len(members) - 1) * P))
    return docs


def make_docs(trajectory_windows: Sequence[Window], seq_len: int, mode: str) -> list[PackDoc]:
    if mode == "shared_prefix":
        return shared_prefix_docs(trajectory_windows, seq_len)
    if mode == "standard":
        return [standalone_doc(w) for w in trajectory_windows]
    raise ValueError(f"packing={mode!r}; choose one of {PACK_MODES}")


def assemble_row(docs: Sequence[PackDoc], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    row = {name: np.zeros(seq_len, np.int32) for name in ROW_FIELDS}
    row["input_ids"][:] = pad_id
    row["targets"][:] = pad_id
    at = 0
    for d, doc in enumerate(docs, start=1):
        end = at + len(doc)
        for name in ("input_ids", "targets", "loss_mask", "positions", "window_ids"):
            row[name][at:end] = getattr(doc, name)
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
                      mode: str = "shared_prefix", pad_id: int = 0
                      ) -> tuple[list[dict[str, np.ndarray]], PackStats]:
    docs = [d for ws in windows_per_trajectory for d in make_docs(ws, seq_len, mode)]
    return pack_docs(docs, seq_len, pad_id)

