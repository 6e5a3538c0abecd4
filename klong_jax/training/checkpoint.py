"""Orbax checkpoints of the whole training state: params, optimizer state, step, the Grain iterator.

Async saves; keep the last k plus every n-th; only finalised (complete) checkpoints are ever restored;
every process writes its own shards into the one directory (multi-host).
"""
import logging

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str, *, keep_last: int = 3, keep_every: int | None = None,
                 async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last, keep_period=keep_every or None, enable_async_checkpointing=async_save,
            create=True)
        self.directory = directory
        self.mgr = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self.mgr.latest_step()

    def save(self, step: int, state, *, data_iter=None, meta: dict | None = None, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.mgr.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, target_state, *, data_iter=None):
        """target_state: a pytree of jax.ShapeDtypeStruct with shardings (any mesh: Orbax reshards)."""
        args = {"state": ocp.args.StandardRestore(target_state), "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.mgr.restore(step, args=ocp.args.Composite(**args))
        log.info("restored step %d from %s", step, self.directory)
        return restored["state"], restored["meta"]

    def meta(self, step: int) -> dict:
        """The JSON meta saved with `step` alone (no state read)."""
        restored = self.mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"] or {})

    def wait(self) -> None:
        self.mgr.wait_until_finished()

    def close(self) -> None:
        self.mgr.wait_until_finished()
        self.mgr.close()


def abstract_with_shardings(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
