"""A data iterator that fetches the next batch while the device trains on this one, and whose
checkpointed state is the position after the last batch actually trained on.

Without this, saving after step s would record the iterator past the prefetched batch s+1, and a resumed
run would silently skip it (breaking bitwise-exact resume).
"""
import json


class LookaheadIterator:
    """Wraps a Grain DatasetIterator; Grain's Orbax handler saves it through get_state()/set_state()."""

    def __init__(self, iterator):
        self._it = iterator
        self._state_before_pending = None  # inner state before the fetched-but-untrained batch

    def __iter__(self):
        return self

    def __next__(self):
        state = self._it.get_state()
        item = next(self._it)
        self._state_before_pending = state
        return item

    def consumed(self) -> None:
        """The last fetched batch has been handed to a train step."""
        self._state_before_pending = None

    def position(self) -> dict:
        return self._it.get_state() if self._state_before_pending is None else self._state_before_pending

    # Grain's CheckpointHandler protocol for non-DatasetIterator items: bytes in and out.
    def get_state(self) -> bytes:
        return json.dumps(self.position()).encode()

    def set_state(self, state: bytes) -> None:
        self._it.set_state(json.loads(state.decode() if isinstance(state, bytes) else state))
        self._state_before_pending = None

    def start_prefetch(self) -> None:
        pass
