"""Random-access record sources for Grain: JSONL files (a line index built once) and the records of
an ArrayRecord dataset written by the TFDS builder (tfds_source.py). Both yield RawRecord, so
parsing, validation and error reports (file and line) are the same for both.
"""
from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RawRecord:
    source: str     # file (or dataset) the record came from
    line: int       # 1-based line in that file
    data: bytes     # the JSON text of one trajectory


def expand_paths(patterns: Sequence[str] | str) -> list[str]:
    """Files matching comma-separated globs or a list of globs, sorted within each pattern."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p]
    paths: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        matched = [p for p in matched if os.path.isfile(p)]
        if not matched:
            raise FileNotFoundError(f"data path {pattern!r} matches no file")
        paths += matched
    return paths


class JsonlSource:
    """Every non-blank line of a list of JSONL files, by index. Picklable (no open handles)."""

    def __init__(self, paths: Sequence[str] | str):
        self.paths = expand_paths(paths)
        files, offsets, lengths, lines = [], [], [], []
        for f_idx, path in enumerate(self.paths):
            offset = 0
            with open(path, "rb") as f:
                for number, raw in enumerate(f, start=1):
                    if raw.strip():
                        files.append(f_idx)
                        offsets.append(offset)
                        lengths.append(len(raw))
                        lines.append(number)
                    offset += len(raw)
        self._file = np.asarray(files, np.int32)
        self._offset = np.asarray(offsets, np.int64)
        self._length = np.asarray(lengths, np.int64)
        self._line = np.asarray(lines, np.int64)
        self._handles: dict[int, object] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __len__(self) -> int:
        return int(self._file.shape[0])

    def __getitem__(self, index: int) -> RawRecord:
        f_idx = int(self._file[index])
        handle = self._handles.get(f_idx)
        if handle is None:
            handle = self._handles[f_idx] = open(self.paths[f_idx], "rb")
        handle.seek(int(self._offset[index]))
        data = handle.read(int(self._length[index]))
        return RawRecord(self.paths[f_idx], int(self._line[index]), data)

    def __repr__(self) -> str:
        return f"JsonlSource({len(self.paths)} file(s), {len(self)} records)"
