"""A bounded pool of concurrently running episode sandboxes."""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

from klong_jax.sandbox.limits import SandboxLimits
from klong_jax.sandbox.sandbox import Sandbox


class SandboxPool:
    """At most `max_concurrent` sandboxes live at once; episode() blocks until a slot is free. Each
    sandbox has its own uid, namespaces and episode directory, so episodes cannot interfere."""

    def __init__(self, max_concurrent: int, limits: SandboxLimits | None = None, **sandbox_kwargs):
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self.max_concurrent = max_concurrent
        self.limits = limits
        self._sandbox_kwargs = sandbox_kwargs
        self._slots = threading.BoundedSemaphore(max_concurrent)

    @contextlib.contextmanager
    def episode(self, episode_dir: str | os.PathLike, limits: SandboxLimits | None = None
                ) -> Iterator[Sandbox]:
        with self._slots:
            sandbox = Sandbox(episode_dir, limits=limits or self.limits, **self._sandbox_kwargs)
            try:
                yield sandbox
            finally:
                sandbox.close()
