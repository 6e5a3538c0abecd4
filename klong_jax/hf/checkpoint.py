"""Read and write sharded safetensors checkpoints (`model.safetensors` or `*.index.json` + shards)."""
import json
import os
from collections import OrderedDict

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsReader:
    """Key -> file lookup over a (sharded) checkpoint; reads one tensor at a time, caching a few."""

    def __init__(self, path: str, cache_size: int = 4):
        self.path = path
        index_path = os.path.join(path, INDEX_NAME)
        if os.path.exists(index_path):
            with open(index_path) as f:
                self.key_to_file = dict(json.load(f)["weight_map"])
        elif os.path.exists(os.path.join(path, SINGLE_NAME)):
            with safe_open(os.path.join(path, SINGLE_NAME), "numpy") as f:
                self.key_to_file = {k: SINGLE_NAME for k in f.keys()}
        else:
            raise FileNotFoundError(f"{path}: neither {INDEX_NAME} nor {SINGLE_NAME} found")
        self._handles: dict[str, object] = {}
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def keys(self):
        return self.key_to_file.keys()

    def _handle(self, key):
        fname = self.key_to_file[key]
        if fname not in self._handles:
            self._handles[fname] = safe_open(os.path.join(self.path, fname), "numpy")
        return self._handles[fname]

    def shape(self, key) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def get(self, key) -> np.ndarray:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        arr = self._handle(key).get_tensor(key)
        self._cache[key] = arr
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return arr


class SafetensorsWriter:
    """Streams tensors into shards of at most max_shard_bytes, then writes the index."""

    def __init__(self, path: str, max_shard_bytes: int = 4 << 30):
        os.makedirs(path, exist_ok=True)
        self.path, self.max_shard_bytes = path, max_shard_bytes
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, key: str, array: np.ndarray) -> None:
        if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[key] = np.ascontiguousarray(array)
        self._pending_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def _flush(self) -> None:
        name = f"shard-{len(self._shards):05d}.tmp.safetensors"
        save_file(self._pending, os.path.join(self.path, name), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, keys in enumerate(self._shards):
            tmp = os.path.join(self.path, f"shard-{i:05d}.tmp.safetensors")
            final = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, os.path.join(self.path, final))
            weight_map.update({k: final for k in keys})
        if n > 1:
            with open(os.path.join(self.path, INDEX_NAME), "w") as f:
                json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
