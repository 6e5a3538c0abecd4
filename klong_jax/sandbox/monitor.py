"""One background thread that watches every live sandbox of this process.

Once per interval it counts the tasks of all sandbox uids in a single /proc scan, and for each sandbox:
ends the episode at its wall-clock limit (even while no command runs), and kills all of the episode's
processes when its tasks stay at max_processes (a fork bomb that escaped its command would otherwise
burn CPU and make every later command fail).
"""
from __future__ import annotations

import logging
import threading
import time
import weakref

from klong_jax.sandbox import processes

log = logging.getLogger(__name__)
INTERVAL_S = 1.0


class _Monitor:
    def __init__(self):
        self._sandboxes: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def register(self, sandbox) -> None:
        with self._lock:
            self._sandboxes.add(sandbox)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="klong-sandbox-monitor",
                                                daemon=True)
                self._thread.start()

    def unregister(self, sandbox) -> None:
        with self._lock:
            self._sandboxes.discard(sandbox)

    def _loop(self) -> None:
        while True:
            time.sleep(INTERVAL_S)
            with self._lock:
                sandboxes = list(self._sandboxes)
                if not sandboxes:
                    self._thread = None  # restarted by the next register()
                    return
            try:
                tasks = processes.tasks_by_uid({sb.uid for sb in sandboxes})
            except OSError:
                log.exception("sandbox monitor could not read /proc")
                continue
            now = time.monotonic()
            for sandbox in sandboxes:
                try:
                    sandbox._monitor_tick(tasks.get(sandbox.uid, 0), now)
                except Exception:  # one sandbox's failure must not stop the watch over the others
                    log.exception("sandbox monitor failed on %s", sandbox.episode_dir)


MONITOR = _Monitor()
