"""A batching queue: requests that arrive while the worker collects a batch are generated together.

One worker thread owns the sampler. It takes the first waiting request, then keeps collecting for
`window_s` (or until `max_batch` rows), and runs them as one `generate` call. Requests that arrive during
a generation wait and form the next batch, so under load batches fill up on their own.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass


@dataclass
class _Request:
    rows: list            # [(prompt_ids, SamplingParams)], generated side by side (n > 1 choices)
    future: Future


class BatchQueue:
    """generate_fn(prompts, params_list) -> list of results, one per prompt, in order."""

    def __init__(self, generate_fn: Callable[[list, list], Sequence], *, window_s: float = 0.005,
                 max_batch: int = 32):
        if max_batch < 1 or window_s < 0:
            raise ValueError(f"max_batch={max_batch} must be >= 1 and window_s={window_s} >= 0")
        self._generate, self.window_s, self.max_batch = generate_fn, window_s, max_batch
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._lock = threading.Lock()
        self.batch_sizes: list[int] = []     # rows per generate call, oldest first
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="batch-queue", daemon=True)
        self._worker.start()

    def submit(self, rows: list) -> Future:
        """rows: [(prompt_ids, SamplingParams)]; the future resolves to their results, in order."""
        if self._closed:
            raise RuntimeError("BatchQueue is closed")
        if not rows:
            raise ValueError("a request needs at least one row")
        fut: Future = Future()
        self._queue.put(_Request(list(rows), fut))
        return fut

    def stats(self) -> dict:
        with self._lock:
            sizes = list(self.batch_sizes)
        return {"batches": len(sizes), "batch_sizes": sizes, "max_batch_size": max(sizes, default=0)}

    def close(self, timeout: float | None = 30.0) -> None:
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout)

    def _collect(self, first: _Request) -> tuple[list[_Request], bool]:
        batch, n = [first], len(first.rows)
        deadline = time.monotonic() + self.window_s
        while n < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
            n += len(item.rows)
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._collect(first)
            rows = [row for req in batch for row in req.rows]
            with self._lock:
                self.batch_sizes.append(len(rows))
            try:
                results = list(self._generate([r[0] for r in rows], [r[1] for r in rows]))
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                for req in batch:
                    req.future.set_exception(e)
                continue
            start = 0
            for req in batch:
                req.future.set_result(results[start:start + len(req.rows)])
                start += len(req.rows)
