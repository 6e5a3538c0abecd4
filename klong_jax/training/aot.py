"""Compile the real SFT train step for a TPU topology from a CPU machine (libtpu installed, no TPU); without a
topology, for this process's own devices (e.g. the emulated CPU mesh of the tests). The shared pieces here
(`abstract_run`, `compile_report`, `config_mesh`) also compile an RL stage's functions (klong_jax/rl/aot.py).

Nothing is allocated: parameters, optimizer state and the batch are ShapeDtypeStructs carrying the
shardings the rules give them on a mesh built over the topology's devices. Reports each compiled function's
per-device memory (arguments, outputs, temporaries), FLOPs and compile seconds.
"""
import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils, topologies
from jax.sharding import AxisType, Mesh

from klong_jax.models.from_config import model_config_from
from klong_jax.sharding import MESH_AXES, make_mesh, resolve_mesh_shape
from klong_jax.training.state import abstract_state
from klong_jax.training.trainable import run_layout
from klong_jax.training.step import batch_shardings, jit_train_step
from klong_jax.training.checkpoint import abstract_with_shardings

GIB = 2 ** 30
# HBM per chip in GiB (what the TPU compiler reports as available, rounded down).
HBM_GIB = {"v4": 31.0, "v5e": 15.0, "v5litepod": 15.0, "v5p": 95.0, "v6e": 31.0}


def hbm_gib(topology: str | None) -> float | None:
    return HBM_GIB.get(topology.split(":")[0]) if topology else None


def topology_mesh(topology: str, mesh_shape: dict) -> Mesh:
    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    full = resolve_mesh_shape(mesh_shape, len(topo.devices))
    dims = tuple(full[a] for a in MESH_AXES)
    # Torus-aware device order; splitting physical axes lets e.g. expert=8 live on a 4x4x4 slice.
    devices = mesh_utils.create_device_mesh(dims, devices=topo.devices, allow_split_physical_axes=True)
    return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def config_mesh(cfg, topology: str | None) -> Mesh:
    """The config's mesh over the topology's devices, or (topology None / "") over this process's devices."""
    return topology_mesh(topology, dict(cfg.mesh.shape)) if topology else make_mesh(dict(cfg.mesh.shape))


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (its largest shard per leaf)."""
    return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * jnp.dtype(a.dtype).itemsize
               for a in jax.tree.leaves(tree))


def compile_report(lowered, topology: str | None, resident_bytes: int = 0) -> dict:
    """Compile `lowered`; its per-device memory, whether it fits the topology's HBM, FLOPs and compile seconds.

    resident_bytes: per-device bytes of device arrays that stay live during the call without being its arguments
    (e.g. the optimizer state while the old log-probs are computed); counted towards `fits`."""
    hbm = hbm_gib(topology)
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses programs that exceed HBM
        match = re.search(r"required for HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(e))
        if not match:
            raise
        return {"compiled": False, "fits": False, "temporaries_gib_required": float(match.group(1)),
                "hbm_gib": float(match.group(2)), "compile_s": round(time.perf_counter() - t0, 1)}
    compile_s = round(time.perf_counter() - t0, 1)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    per_device = {
        "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes), "alias_bytes": int(getattr(mem, "alias_size_in_bytes", 0)),
    }
    # Donated state aliases its outputs: peak = arguments + temporaries + outputs not aliased to inputs.
    peak = per_device["argument_bytes"] + per_device["temp_bytes"] + per_device["output_bytes"] - per_device["alias_bytes"]
    per_device.update(peak_bytes=peak, peak_gib=round(peak / GIB, 2))
    if resident_bytes:
        per_device.update(resident_bytes=int(resident_bytes),
                          peak_with_resident_gib=round((peak + resident_bytes) / GIB, 2))
    return {
        # The compiler accepted the program; whether its peak fits HBM is judged here too (a program whose
        # arguments plus temporaries exceed HBM has been seen to compile).
        "compiled": True, "hbm_gib": hbm,
        "fits": hbm is None or (peak + resident_bytes) / GIB <= hbm,
        "per_device": per_device,
        "flops_per_device": float(cost.get("flops", 0.0)) if cost else None,
        "compile_s": compile_s,
    }


def mesh_info(topology, mesh, model_cfg) -> dict:
    return {"topology": topology or f"{jax.default_backend()} devices", "devices": mesh.devices.size,
            "mesh": dict(zip(MESH_AXES, mesh.devices.shape)), "remat_policy": model_cfg.remat_policy,
            "attention_impl": model_cfg.attention_impl}


@dataclasses.dataclass
class AbstractRun:
    """What sft.py / rl/loop.py build before their first step, abstract: the optimizer and schedule, what trains
    (TrainablePlan, TrainLayout) and the step's inputs as ShapeDtypeStructs with their shardings."""
    tx: object
    lr_schedule: object
    plan: object
    graphdef: object
    rest_sh: object
    layout: object
    state: dict      # {"params": the trainable params, "opt_state", "step"}
    rest: object
    frozen: object   # the plan's frozen params ({}: every parameter trains)


def abstract_run(cfg, model_cfg, mesh, steps: int) -> AbstractRun:
    """As training/sft.py and rl/loop.py setup_stage lay a run out (`run_layout`; call inside
    `jax.set_mesh(mesh)`), with the step's inputs abstract."""
    run = run_layout(cfg, model_cfg, mesh, steps)
    layout = run.layout
    return AbstractRun(tx=run.tx, lr_schedule=run.lr_schedule, plan=layout.plan, graphdef=run.graphdef,
                       rest_sh=run.rest_sh, layout=layout,
                       state=abstract_state(layout.abs_trainable, run.tx, layout.state_sh),
                       rest=abstract_with_shardings(run.abs_rest, run.rest_sh),
                       frozen=abstract_with_shardings(layout.abs_frozen, layout.frozen_sh))


def compile_train_step(cfg, topology: str | None) -> dict:
    """The SFT train step of `cfg` compiled for `topology` (None: this process's devices)."""
    model_cfg = model_config_from(cfg.model)
    mesh = config_mesh(cfg, topology)
    tcfg = cfg.train
    with jax.set_mesh(mesh):
        run = abstract_run(cfg, model_cfg, mesh, tcfg.steps)
        batch_sh = batch_shardings(mesh, (tcfg.global_batch, tcfg.seq_len))
        step_fn = jit_train_step(run.graphdef, run.tx, run.lr_schedule, run.layout.state_sh, run.rest_sh, batch_sh,
                                 micro_batches=tcfg.micro_batches, z_loss_weight=tcfg.z_loss,
                                 loss_chunk=tcfg.loss_chunk, plan=run.plan, frozen_sh=run.layout.frozen_sh)
        batch = {k: jax.ShapeDtypeStruct((tcfg.global_batch, tcfg.seq_len), jnp.int32, sharding=s)
                 for k, s in batch_sh.items()}
        report = compile_report(step_fn.lower(run.state, run.rest, batch, run.frozen), topology)
    return {**mesh_info(topology, mesh, model_cfg), "seq_len": tcfg.seq_len, "global_batch": tcfg.global_batch,
            "micro_batches": tcfg.micro_batches, "trainable": run.plan.config.spec(), **report}


# The RL batch (klong_jax/rl/batch.py build_rows / to_batches): the packed rows' int32 fields, then the RL extras;
# `old_logprobs` is added by the loop before the update (rl/loop.py update_policy).
