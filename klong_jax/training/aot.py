"""Compile the real SFT train step for a TPU topology from a CPU machine (libtpu installed, no TPU).

Nothing is allocated: parameters, optimizer state and the batch are ShapeDtypeStructs carrying the
shardings the rules give them on a mesh built over the topology's devices. Reports the compiled step's
per-device memory (arguments, outputs, temporaries) and FLOPs.
"""
import re

import jax
import jax.numpy as jnp
from jax.experimental import mesh_utils, topologies
from jax.sharding import AxisType, Mesh

from klong_jax.models.from_config import model_config_from
from klong_jax.sharding import MESH_AXES, resolve_mesh_shape
from klong_jax.training.optimizer import learning_rate_schedule, make_optimizer
from klong_jax.training.state import abstract_layout, abstract_state
from klong_jax.training.step import batch_shardings, jit_train_step, state_shardings
from klong_jax.training.checkpoint import abstract_with_shardings

GIB = 2 ** 30
# HBM per chip in GiB (what the TPU compiler reports as available, rounded down).
HBM_GIB = {"v4": 31.0, "v5e": 15.0, "v5litepod": 15.0, "v5p": 95.0, "v6e": 31.0}


def hbm_gib(topology: str) -> float | None:
    return HBM_GIB.get(topology.split(":")[0])


def topology_mesh(topology: str, mesh_shape: dict) -> Mesh:
    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    full = resolve_mesh_shape(mesh_shape, len(topo.devices))
    dims = tuple(full[a] for a in MESH_AXES)
    # Torus-aware device order; splitting physical axes lets e.g. expert=8 live on a 4x4x4 slice.
    devices = mesh_utils.create_device_mesh(dims, devices=topo.devices, allow_split_physical_axes=True)
    return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def compile_train_step(cfg, topology: str) -> dict:
    model_cfg = model_config_from(cfg.model)
    mesh = topology_mesh(topology, dict(cfg.mesh.shape))
    tcfg = cfg.train
    with jax.set_mesh(mesh):
        tx = make_optimizer(cfg.optimizer, tcfg.steps)
        graphdef, abs_params, abs_rest, param_sh, rest_sh = abstract_layout(model_cfg, mesh)
        state_sh = state_shardings(tx, param_sh, abs_params, mesh)
        batch_sh = batch_shardings(mesh, (tcfg.global_batch, tcfg.seq_len))
        step_fn = jit_train_step(graphdef, tx, learning_rate_schedule(cfg.optimizer, tcfg.steps), state_sh, rest_sh,
                                 batch_sh, micro_batches=tcfg.micro_batches, z_loss_weight=tcfg.z_loss,
                             loss_chunk=tcfg.loss_chunk)
        batch = {k: jax.ShapeDtypeStruct((tcfg.global_batch, tcfg.seq_len), jnp.int32, sharding=s)
                 for k, s in batch_sh.items()}
        lowered = step_fn.lower(abstract_state(abs_params, tx, state_sh), abstract_with_shardings(abs_rest, rest_sh),
                                batch)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses programs that exceed HBM
            match = re.search(r"required for HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(e))
            if not match:
                raise
            return {"topology": topology, "devices": mesh.devices.size, "mesh": dict(zip(MESH_AXES, mesh.devices.shape)),
                    "seq_len": tcfg.seq_len, "global_batch": tcfg.global_batch, "remat_policy": model_cfg.remat_policy,
                    "attention_impl": model_cfg.attention_impl, "compiled": False, "fits": False,
                    "temporaries_gib_required": float(match.group(1)), "hbm_gib": float(match.group(2))}
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    per_device = {
        "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes), "alias_bytes": int(getattr(mem, "alias_size_in_bytes", 0)),
    }
    # Donated state aliases its outputs: peak = arguments + temporaries + outputs not aliased to inputs.
    peak = per_device["argument_bytes"] + per_device["temp_bytes"] + per_device["output_bytes"] - per_device["alias_bytes"]
    return {
        "topology": topology, "devices": mesh.devices.size, "mesh": dict(zip(MESH_AXES, mesh.devices.shape)),
        "seq_len": tcfg.seq_len, "global_batch": tcfg.global_batch, "micro_batches": tcfg.micro_batches,
        "remat_policy": model_cfg.remat_policy, "attention_impl": model_cfg.attention_impl,
        # The compiler accepted the program; whether its peak fits HBM is judged here too (a program whose
        # arguments plus temporaries exceed HBM has been seen to compile).
        "compiled": True, "hbm_gib": hbm_gib(topology),
        "fits": hbm_gib(topology) is None or peak / GIB <= hbm_gib(topology),
        "per_device": {**per_device, "peak_bytes": peak, "peak_gib": round(peak / GIB, 2)},
        "flops_per_device": float(cost.get("flops", 0.0)) if cost else None,
    }
