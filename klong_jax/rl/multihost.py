"""Multi-process (multi-host) RL: how a step's rollouts and update are split over the `jax.distributed` processes.

Contract (rl/loop.py `run_rl`, `learn_from_episodes`, `update_policy`), with P = jax.process_count() and p this
process's index:
  - rollouts: the step's `rl.tasks_per_step` tasks are cut into P contiguous blocks (`process_share`); process p
    rolls out whole groups (all `group_size` episodes of each of its tasks) with its own sampler on its own local
    devices (`sampler_inputs`), its own sandboxes and its own episodes directory. GRPO advantages are relative to a
    group only, so each process computes its groups' advantages locally and exactly.
  - the update: every batch of `rl.batch_rows` rows holds `batch_rows / P` rows from each process (`local_rows`);
    the processes agree on the number of batches (`process_max`), the shorter ones padding with fully masked rows,
    and `global_rows` makes the global arrays from the process-local rows. The update itself is the same SPMD
    program on every process. The loss is a sum over a batch's tokens normalised by its loss tokens, so it does not
    depend on which process's rows come first.
  - what is logged: per-episode records (JSON) are gathered over the processes in process order, which is the
    step's task order (`allgather_objects`); every process computes the same metrics from them, process 0 writes.
With one process every helper is the identity (or a plain `jax.device_put`): the single-process numbers are the
ones the loop has always produced.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from klong_jax.data.packing import ROW_FIELDS


def process_share(order, num_processes: int | None = None, process_index: int | None = None):
    """This process's contiguous block of a step's task order (the whole order with one process).
    Raises unless len(order) divides by the process count: every process rolls out whole groups."""
    P = jax.process_count() if num_processes is None else num_processes
    p = jax.process_index() if process_index is None else process_index
    if len(order) % P:
        raise ValueError(f"rl.tasks_per_step={len(order)} must be divisible by the {P} processes: each process "
                         "rolls out whole groups (all group_size episodes of its tasks)")
    k = len(order) // P
    return order[p * k:(p + 1) * k]


def local_rows(batch_rows: int, num_processes: int | None = None) -> int:
    """Rows each process contributes to one batch of `batch_rows` (rl.batch_rows) rows."""
    P = jax.process_count() if num_processes is None else num_processes
    if batch_rows % P:
        raise ValueError(f"rl.batch_rows={batch_rows} must be divisible by the {P} processes: each batch holds "
                         "batch_rows / processes rows from every process")
    return batch_rows // P


def allgather_objects(obj) -> list:
    """[obj of process 0, obj of process 1, ...] on every process; obj: anything json.dumps takes (floats round-trip
    exactly). A collective: every process must call it in the same order. One process: [obj]."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(data.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, sizes)]


def process_sum(value: float) -> float:
    """The sum of a number over the processes (the number itself with one process)."""
    return float(sum(allgather_objects(value)))


def process_max(value: float) -> float:
    """The maximum of a number over the processes (the number itself with one process)."""
    return max(allgather_objects(value))


def empty_row(seq_len: int, num_moe_layers: int, top_k: int) -> dict:
    """A fully masked RL row (no loss, routing unknown), with the fields and dtypes of rl/batch.py `build_rows`:
    the padding of a process that has fewer rows than another one (or none at all)."""
    row = {name: np.zeros(seq_len, np.int32) for name in ROW_FIELDS}
    row.update(rl_mask=np.zeros(seq_len, np.int32), advantages=np.zeros(seq_len, np.float32),
               sampler_logprobs=np.zeros(seq_len, np.float32),
               routed=np.full((seq_len, num_moe_layers, top_k), -1, np.int32))
    return row


def masked_batch(row: dict, rows: int) -> dict:
    """A batch of `rows` fully masked rows shaped like `row` (zeros; routing -1, unknown), as rl/batch.py
    `to_batches` pads its last batch."""
    return {k: np.repeat((np.full_like(v, -1) if k == "routed" else np.zeros_like(v))[None], rows, axis=0)
            for k, v in row.items()}


def _rows_split_over_processes(sharding, global_shape, rows_per_process: int) -> bool:
    """Whether `sharding` gives each process its own `rows_per_process` rows, disjoint from every other process's
    (the batch axis split over the processes): then each process only needs its own rows. The same answer on every
    process (it reads the whole sharding)."""
    rows = {}
    for device, index in sharding.devices_indices_map(tuple(global_shape)).items():
        start, stop, _ = index[0].indices(global_shape[0])
        rows.setdefault(device.process_index, set()).update(range(start, stop))
    sets = list(rows.values())
    return (all(len(s) == rows_per_process for s in sets)
            and len(set().union(*sets)) == rows_per_process * len(sets))


def global_rows(local: np.ndarray, sharding) -> jax.Array:
    """Process-local rows [b, ...] -> the global [P * b, ...] array on `sharding` holding every process's b rows.
    One process: jax.device_put. The batch axis split over the processes (the usual layout: batch on data/fsdp):
    jax.make_array_from_process_local_data, no data leaves its process. Otherwise (a batch replicated over
    processes, e.g. batch_rows smaller than the data axes): the rows are gathered to every process first, process
    p's at rows p*b .. (p+1)*b - 1. A collective in that case: every process calls it in the same order."""
    P = jax.process_count()
    if P == 1:
        return jax.device_put(local, sharding)
    shape = (local.shape[0] * P,) + local.shape[1:]
    if _rows_split_over_processes(sharding, shape, local.shape[0]):
        return jax.make_array_from_process_local_data(sharding, local, shape)
    full = np.asarray(multihost_utils.process_allgather(local, tiled=True))
    return jax.make_array_from_callback(shape, sharding, lambda index: full[index])


def host_copy(tree):
    """A pytree of global arrays as numpy on every process (the identity with one process): what a process-local
    sampler is given (each process's sampler holds the whole policy on its own devices)."""
    if jax.process_count() == 1:
        return tree

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)   # already whole on this process
    return jax.tree.map(one, tree)


def sampler_inputs(params, rest, mesh, rollout):
    """(params, rest, mesh, rollout) to build this process's rollout sampler from. One process: unchanged (the
    sampler may share the trainer's mesh). Several: the sampler must not span other processes' devices (each
    process decodes its own episodes at its own pace, no SPMD lockstep), so the weights are gathered to the host
    (`host_copy`) and the sampler's mesh is rollout.mesh (default: fsdp) over this process's first rollout.devices
    local devices from rollout.first_device on (devices 0: all of them); the returned rollout config has no devices
    and no mesh of its own, so `rollout_model` keeps that local mesh."""
    if jax.process_count() == 1:
        return params, rest, mesh, rollout
    from klong_jax.sharding import make_mesh
    local = jax.local_devices()
    chosen = rollout.device_slice(local, "this process's local device list") if rollout is not None else local
    local_mesh = make_mesh(dict(rollout.mesh) if rollout is not None and rollout.mesh else {"fsdp": -1}, chosen)
    rollout = dataclasses.replace(rollout, devices=0, first_device=0, mesh=()) if rollout is not None else None
    return host_copy(params), host_copy(rest), local_mesh, rollout


@functools.lru_cache(maxsize=None)
def _token_sums(mesh):
    """jit'd (loss tokens, sum |logprobs - sampler_logprobs| over them) of a global batch, replicated scalars."""
    from jax.sharding import NamedSharding, PartitionSpec
    import jax.numpy as jnp
    replicated = NamedSharding(mesh, PartitionSpec())

    def sums(mask, logprobs, sampler_logprobs):
        on = mask > 0
        gap = jnp.where(on, jnp.abs(logprobs.astype(jnp.float32) - sampler_logprobs), 0.0) \
            if logprobs is not None else jnp.zeros(())
        return jnp.sum(on.astype(jnp.int32)), jnp.sum(gap)

    return jax.jit(sums, out_shardings=(replicated, replicated))


def loss_tokens(mesh, batch) -> int:
    """Loss tokens (rl_mask > 0) of a global batch, over every process's rows."""
    count, _ = _token_sums(mesh)(batch["rl_mask"], None, batch["sampler_logprobs"])
    return int(count)


def mean_gap(mesh, batch, logprobs) -> float:
    """Mean |logprobs - sampler log-probs| over a global batch's loss tokens (0.0 when it has none)."""
    count, gap = _token_sums(mesh)(batch["rl_mask"], logprobs, batch["sampler_logprobs"])
    return float(gap) / int(count) if int(count) else 0.0
