"""Bounded capture of a command's output: keeps the head and the tail, counts what it drops."""
from __future__ import annotations

import collections


class BoundedOutput:
    """Accumulates bytes in O(limit) memory whatever the command prints.

    The first half of the budget keeps the head (how the command started), the second half keeps the
    most recent bytes (where errors usually are); everything between is counted and dropped.
    """

    def __init__(self, limit_bytes: int):
        if limit_bytes <= 0:
            raise ValueError(f"limit_bytes must be positive, got {limit_bytes}")
        self._head_limit = limit_bytes // 2
        self._tail_limit = limit_bytes - self._head_limit
        self._head = bytearray()
        self._tail: collections.deque[bytes] = collections.deque()
        self._tail_len = 0
        self.total_bytes = 0

    def add(self, chunk: bytes) -> None:
        self.total_bytes += len(chunk)
        room = self._head_limit - len(self._head)
        if room > 0:
            self._head += chunk[:room]
            chunk = chunk[room:]
        if not chunk:
            return
        if len(chunk) >= self._tail_limit:
            self._tail.clear()
            self._tail.append(bytes(chunk[-self._tail_limit:]))
            self._tail_len = self._tail_limit
            return
        self._tail.append(bytes(chunk))
        self._tail_len += len(chunk)
        while self._tail_len - len(self._tail[0]) >= self._tail_limit:
            self._tail_len -= len(self._tail.popleft())

    @property
    def dropped_bytes(self) -> int:
        return self.total_bytes - len(self._head) - min(self._tail_len, self._tail_limit)

    @property
    def truncated(self) -> bool:
        return self.dropped_bytes > 0

    def text(self) -> str:
        tail = b"".join(self._tail)
        if len(tail) > self._tail_limit:
            tail = tail[-self._tail_limit:]
        head = self._head.decode("utf-8", errors="replace")
        tail_text = tail.decode("utf-8", errors="replace")
        if not self.truncated:
            return head + tail_text
        marker = (f"\n[... output truncated: {self.dropped_bytes} of {self.total_bytes} bytes omitted "
                  f"...]\n")
        return head + marker + tail_text
