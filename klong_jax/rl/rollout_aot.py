"""The rollout sampler of an RL stage compiled ahead of time, nothing allocated: its session prefill, its decode
loop and the trainer -> sampler weight sync, at the stage's shapes, for a TPU topology (libtpu, no TPU) or this
process's devices; plus whether training and sampling can share the chips (launch/plan.py with an RL config).

Shapes (RL config `cfg`, `rl` = cfg.rl, `rollout` = cfg.rollout, RolloutConfig):
  B = the session cache's rows: rl.max_concurrent_episodes rounded as the Sampler rounds it (a power of two and a
      multiple of the devices the `batch` axis spreads over on the sampler's mesh: `Sampler.min_batch`), so a mesh
      whose batch axes exceed max_concurrent_episodes pays for padding rows, as it would at run time;
  S = rl.seq_len cache slots per row (a whole episode context);
  C = rollout.session_chunk new tokens per row per prefill call (sessions.py: a turn's new tokens go in
      ceil(m / C) such calls);
  N = `max_new` decode columns (a turn's new-token bucket; only the small per-row output buffers depend on it);
  L = all decoder layers, K kv heads, H head dim; the cache [L, B, S, K, H] (k and v) in the sampler's compute
      dtype, sharded by CACHE_AXES (batch over data/fsdp/expert, seq over context, kv heads over tensor).

The sampler's mesh (`sampler_mesh`): rollout.devices == 0 and no rollout.mesh: the trainer's mesh itself
("trainer"); otherwise a mesh of rollout.mesh's axes (default fsdp over all) over the rollout.devices devices (0:
all) from rollout.first_device on, in id order as at run time (agent/sampler_policy.py rollout_model). When those
are exactly the trainer's devices ("colocated"), the mesh takes them in the trainer mesh's order, so one jit can read
the trainer's arrays and write the sampler's; otherwise ("separate") the sampler sits on other chips.

Functions (ROLLOUT_FUNCTIONS), each through the Sampler's own jit wrapper and donation:
  sampler_prefill  decode.append_chunk: C tokens x B rows into the S-slot cache (cache donated);
  sampler_decode   decode.decode_chunk: the decode loop over a state as start_decode builds it (state donated,
                   routing recorded when rl.routing_replay);
  weight_sync      the trainer's synced variables (the RL state's `params` through TrainablePlan.sync_params:
                   trainable, fp32, the trainer's shardings) cast to rollout.dtype and laid out as the sampler's.
                   A jit reads and writes one device set in one order, so the sync is compiled on the trainer's
                   devices: "trainer" / "colocated": straight into the sampler's shardings (the sync is that one
                   program); "separate": into a staging layout, the sampler's mesh shape x `sync` (trainer chips /
                   sampler chips, replicated) over the trainer's devices in their order, from which each sampler
                   chip receives its shard from one trainer chip (a device-to-device copy of
                   `copy_bytes_per_sampler_chip`, not compiled: at run time Sampler.update_params' device_put).
                   Needs sampler chips dividing trainer chips.

`colocated` (trainer and sampler on the same chips, "trainer" / "colocated" placements): per chip, with
  P_t = the RL state (trainable params, optimizer state, step) + rest + frozen,   P_s = the sampler's params,
  KV = the session cache (kept allocated between rollouts: SessionCache holds it), every `peak` from
  compile_report (arguments + temporaries + outputs not aliased to arguments), the phases
    update   = rl_update peak + P_s + KV          (the update runs while the sampler's copy and cache stay)
    prefill  = sampler_prefill peak + P_t         (its arguments hold P_s and KV)
    decode   = sampler_decode peak + P_t
    sync     = weight_sync peak + (P_t - trainer synced params) + P_s + KV   (the old copy lives until replaced)
  fits = every phase <= the chip's HBM. rl_update's peak comes from compile_rl_update in the same plan, or is
  given (`rl_update_peak_bytes`, e.g. from an earlier plan of the same shapes).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from klong_jax.agent.config import RolloutConfig
from klong_jax.models.from_config import model_config_from
from klong_jax.models.glm4_moe import CACHE_AXES
from klong_jax.models.init import abstract_model
from klong_jax.rl.config import RLConfig
from klong_jax.sampling import decode
from klong_jax.sampling.buckets import batch_bucket
from klong_jax.sampling.sampler import batch_devices
from klong_jax.sharding import MESH_AXES, logical_to_spec, resolve_mesh_shape
from klong_jax.sharding.rules import variable_axes
from klong_jax.training.aot import GIB, abstract_run, compile_report, config_mesh, hbm_gib, mesh_info, per_device_bytes

ROLLOUT_FUNCTIONS = ("sampler_prefill", "sampler_decode", "weight_sync")
STOP_IDS = 4   # Z: stop-token columns of the decode state (the Sampler's minimum)


def _mesh_dims(mesh) -> dict:
    return dict(zip(MESH_AXES, mesh.devices.shape))


def sampler_mesh(rollout: RolloutConfig, trainer_mesh: Mesh, topology: str | None) -> tuple[Mesh, str]:
    """(the sampler's mesh, placement "trainer" | "colocated" | "separate"); see the module docstring."""
    if not rollout.devices and not rollout.mesh:
        return trainer_mesh, "trainer"
    devices = sorted(trainer_mesh.devices.flat, key=lambda d: d.id)     # the process's (topology's) devices
    chosen = rollout.device_slice(devices, "the trainer's mesh")         # a mesh alone: over every device
    shape = resolve_mesh_shape(dict(rollout.mesh) or {"fsdp": -1}, len(chosen))
    dims = tuple(shape[a] for a in MESH_AXES)
    if {d.id for d in chosen} == {d.id for d in devices}:
        grid, placement = np.asarray(list(trainer_mesh.devices.flat), dtype=object).reshape(dims), "colocated"
    else:
        placement = "separate"
        grid = None
        if topology:   # torus-aware order where the chips allow it, as topology_mesh
            try:
                grid = mesh_utils.create_device_mesh(dims, devices=chosen, allow_split_physical_axes=True)
            except Exception:  # noqa: BLE001 - a sub-slice the helper cannot lay out: plain id order
                grid = None
        if grid is None:
            grid = np.asarray(chosen, dtype=object).reshape(dims)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)), placement


def sampler_abstract(model_cfg, dtype: str, mesh):
    """(graphdef, abstract params) of the sampler's copy as rollout_model builds it: the model's variables, floating
    ones cast to `dtype` ("" : unchanged), each a ShapeDtypeStruct sharded by its logical axes on `mesh`."""
    cfg_s = model_cfg.replace(param_dtype=dtype, compute_dtype=dtype) if dtype else model_cfg
    graphdef = nnx.split(abstract_model(cfg_s))[0]
    state = nnx.state(abstract_model(model_cfg))
    cast = jnp.dtype(dtype) if dtype else None

    def one(v):
        d = cast if cast is not None and jnp.issubdtype(v.dtype, jnp.floating) else v.dtype
        sh = NamedSharding(mesh, logical_to_spec(variable_axes(v), v.shape, mesh))
        return v.replace(jax.ShapeDtypeStruct(v.shape, d, sharding=sh))

    return graphdef, jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _sharded(shape, dtype, mesh, axes) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, logical_to_spec(axes, shape, mesh)))


def abstract_cache(graphdef, params, B: int, S: int, mesh) -> dict:
    """The session cache of B rows x S slots (init_cache's shapes and dtype), sharded by CACHE_AXES."""
    shapes = jax.eval_shape(lambda p: nnx.merge(graphdef, p).init_cache(B, S), params)
    return jax.tree.map(lambda a: _sharded(a.shape, a.dtype, mesh, CACHE_AXES), shapes)


def kv_cache_bytes(model_cfg, B: int, S: int, itemsize: int) -> int:
    """2 (k, v) x L x B x S x K x H x itemsize: the whole cache, every chip's shard together (unreplicated)."""
    return 2 * model_cfg.num_hidden_layers * B * S * model_cfg.num_key_value_heads * model_cfg.head_dim * itemsize


def _row_batch(B: int, mesh, **extra) -> dict:
    """The per-row settings of a decode batch (Sampler._row_settings' fields and dtypes), batch-sharded."""
    fields = dict(lengths_B=((B,), jnp.int32), active_B=((B,), jnp.bool_), temperature_B=((B,), jnp.float32),
                  top_k_B=((B,), jnp.int32), top_p_B=((B,), jnp.float32), seeds_B=((B,), jnp.int32),
                  stop_ids_BZ=((B, STOP_IDS), jnp.int32), max_new_B=((B,), jnp.int32), **extra)
    return {k: _sharded(shape, dt, mesh, ("batch",) + (None,) * (len(shape) - 1)) for k, (shape, dt) in fields.items()}


def abstract_decode_state(graphdef, params, cache, B: int, S: int, N: int, V: int, routing: bool, mesh) -> dict:
    """The decode state start_decode builds on the session cache (its shapes and dtypes), laid out as the Sampler
    holds it: the cache by CACHE_AXES, per-row arrays by `batch` (routed_LBNK: batch on dim 1), scalars replicated."""
    logits = jax.ShapeDtypeStruct((B, V), jnp.float32)
    batch = _row_batch(B, mesh, kv_valid_BS=((B, S), jnp.bool_))
    w = jax.ShapeDtypeStruct((), jnp.int32)
    shapes = jax.eval_shape(lambda p, c, lg, b, wi: decode.start_decode(graphdef, p, c, lg, b, wi, max_new=N,
                                                                       routing=routing),
                            params, cache, logits, batch, w)

    def lay(key, a):
        if a is None:
            return None
        if key == "cache":
            return jax.tree.map(lambda x: _sharded(x.shape, x.dtype, mesh, CACHE_AXES), a)
        if key == "routed_LBNK":
            return _sharded(a.shape, a.dtype, mesh, (None, "batch", None, None))
        if a.ndim == 0:
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P()))
        return _sharded(a.shape, a.dtype, mesh, ("batch",) + (None,) * (a.ndim - 1))

    return {k: lay(k, v) for k, v in shapes.items()}


def _flat(tree) -> dict:
    return dict(jax.tree_util.tree_flatten_with_path(tree)[0])


def staging_mesh(trainer_mesh: Mesh, s_mesh: Mesh) -> Mesh:
    """The sampler's mesh shape over the trainer's devices in the trainer's order, with a leading `sync` axis of
    trainer chips / sampler chips (each sampler shard held by that many trainer chips, replicated)."""
    n_t, n_s = trainer_mesh.devices.size, s_mesh.devices.size
    if n_t % n_s:
        raise ValueError(f"rollout.devices={n_s}: a separate sampler mesh needs its chips to divide the trainer's "
                         f"({n_t}) for the staged weight sync; pick a divisor of {n_t}")
    grid = np.asarray(list(trainer_mesh.devices.flat), dtype=object).reshape((n_t // n_s,) + s_mesh.devices.shape)
    return Mesh(grid, ("sync",) + MESH_AXES, axis_types=(AxisType.Auto,) * (len(MESH_AXES) + 1))


def compile_rollout(cfg, topology: str | None, functions=None, *, max_new: int = 4096,
                    rl_update_peak_bytes: int | None = None, run=None, trainer_mesh=None) -> dict:
    """The rollout sampler's functions of an RL config (cfg.kind == "rl") compiled for `topology` (None: this
    process's devices), nothing allocated; the contract, shapes and sums are the module docstring's.

    functions: a subset of ROLLOUT_FUNCTIONS (None: all). rl_update_peak_bytes: the RL update's per-chip peak for
    the `colocated` verdict (None: no update phase in the verdict, `colocated.fits` None). run / trainer_mesh:
    the trainer's AbstractRun and mesh when the caller has them (compile_rl_update's), else built here.
    Returns {shapes, sampler mesh and placement, kv_cache bytes (total, per chip), sampler params per chip,
    functions: {name: compile_report(...)}, colocated: {phases, fits}}."""
    rl = RLConfig.from_mapping(cfg.rl)
    rollout = RolloutConfig.from_mapping(cfg.get("rollout"))
    functions = tuple(ROLLOUT_FUNCTIONS if functions is None else functions)
    unknown = set(functions) - set(ROLLOUT_FUNCTIONS)
    if unknown:
        raise ValueError(f"unknown rollout functions {sorted(unknown)}; choose from {ROLLOUT_FUNCTIONS}")
    model_cfg = model_config_from(cfg.model)
    t_mesh = trainer_mesh if trainer_mesh is not None else config_mesh(cfg, topology)
    if run is None:
        with jax.set_mesh(t_mesh):
            run = abstract_run(cfg, model_cfg, t_mesh, rl.steps)
    s_mesh, placement = sampler_mesh(rollout, t_mesh, topology)
    graphdef, params = sampler_abstract(model_cfg, rollout.dtype, s_mesh)
    B = batch_bucket(rl.max_concurrent_episodes, batch_devices(s_mesh))   # Sampler.min_batch rounding
    S, C, N = rl.seq_len, rollout.session_chunk, int(max_new)
    if S % C:
        raise ValueError(f"rl.seq_len={S} is not a multiple of rollout.session_chunk={C}: the session cache holds "
                         "whole chunks; pick a chunk dividing seq_len")
    routing = bool(rl.routing_replay) and model_cfg.num_moe_layers > 0
    reports = {}
    with jax.set_mesh(s_mesh):
        cache = abstract_cache(graphdef, params, B, S, s_mesh)
        cache_dtype = jnp.dtype(jax.tree.leaves(cache)[0].dtype)
        if "sampler_prefill" in functions:
            # SessionCache.append_fn
            fn = jax.jit(lambda p, c, ch, w: decode.append_chunk(graphdef, p, c, ch, w), donate_argnums=(1,))
            chunk = {"input_ids_BC": _sharded((B, C), jnp.int32, s_mesh, ("batch", None)),
                     "positions_BC": _sharded((B, C), jnp.int32, s_mesh, ("batch", None)),
                     "kv_valid_BS": _sharded((B, S), jnp.bool_, s_mesh, ("batch", None))}
            lowered = fn.lower(params, cache, chunk, jax.ShapeDtypeStruct((), jnp.int32))
            reports["sampler_prefill"] = compile_report(lowered, topology)
            del lowered
        if "sampler_decode" in functions:
            # Sampler.decode_fn
            st = abstract_decode_state(graphdef, params, cache, B, S, N, model_cfg.vocab_size, routing, s_mesh)
            fn = jax.jit(lambda p, s, stop_at: decode.decode_chunk(graphdef, p, s, stop_at), donate_argnums=(1,))
            lowered = fn.lower(params, st, jax.ShapeDtypeStruct((), jnp.int32))
            reports["sampler_decode"] = compile_report(lowered, topology)
            del lowered
    sync_info = {}
    synced = run.plan.sync_params(run.state["params"], run.frozen)
    if "weight_sync" in functions:
        s_flat = _flat(nnx.to_pure_dict(params))
        t_flat = _flat(synced)
        missing = [jax.tree_util.keystr(k) for k in t_flat if k not in s_flat]
        if missing:
            raise KeyError(f"weight_sync: {missing[:3]} are not variables of the sampler's model")
        paths = list(t_flat)
        if placement == "separate":
            stage = staging_mesh(t_mesh, s_mesh)
            out_sh = [NamedSharding(stage, s_flat[k].sharding.spec) for k in paths]
        else:
            out_sh = [s_flat[k].sharding for k in paths]
        dtypes = tuple(s_flat[k].dtype for k in paths)
        fn = jax.jit(lambda xs: [x.astype(d) for x, d in zip(xs, dtypes)], out_shardings=out_sh)
        with jax.set_mesh(t_mesh):
            lowered = fn.lower([t_flat[k] for k in paths])
            reports["weight_sync"] = compile_report(lowered, topology)
            del lowered
        out_bytes = sum(int(np.prod(s.shard_shape(t_flat[k].shape))) * jnp.dtype(d).itemsize
                        for k, s, d in zip(paths, out_sh, dtypes))
        sync_info = {"synced_variables": len(paths), "synced_bytes_per_sampler_chip": out_bytes,
                     "staged": placement == "separate",
                     "copy_bytes_per_sampler_chip": out_bytes if placement == "separate" else 0}

    P_s = per_device_bytes(params)
    KV = per_device_bytes(cache)
    P_t = per_device_bytes({"state": run.state, "rest": run.rest, "frozen": run.frozen})
    synced_t = per_device_bytes(synced)
    result = {
        **mesh_info(topology, t_mesh, model_cfg), "kind": "rollout", "hbm_gib": hbm_gib(topology),
        "sampler_mesh": _mesh_dims(s_mesh), "sampler_devices": s_mesh.devices.size, "placement": placement,
        "rollout_dtype": rollout.dtype or model_cfg.param_dtype, "cache_dtype": str(cache_dtype),
        "B": B, "B_asked": rl.max_concurrent_episodes, "S": S, "C": C, "N": N, "routing": routing,
        "kv_cache": {"total_bytes": kv_cache_bytes(model_cfg, B, S, cache_dtype.itemsize),
                     "per_chip_bytes": KV, "per_chip_gib": round(KV / GIB, 2),
                     "spec": str(jax.tree.leaves(cache)[0].sharding.spec)},
        "sampler_params_per_chip_bytes": P_s, "sampler_params_per_chip_gib": round(P_s / GIB, 2),
        "trainer_state_per_chip_bytes": P_t, "trainer_state_per_chip_gib": round(P_t / GIB, 2),
        **({"weight_sync": sync_info} if sync_info else {}),
        "functions": reports,
    }
    result["colocated"] = colocated_verdict(result, rl_update_peak_bytes, synced_t)
    return result


def _peak(report) -> int | None:
    if report is None or not report.get("compiled"):
        return None
    return report["per_device"]["peak_bytes"]


def colocated_verdict(result: dict, rl_update_peak_bytes: int | None, synced_trainer_bytes: int) -> dict:
    """The per-chip phases of training and sampling on the same chips (module docstring) and `fits`: every phase
    known fits the HBM (None: no HBM known, a placement on other chips, or a phase missing)."""
    if result["placement"] == "separate":
        return {"applies": False, "fits": None,
                "why": "the sampler is on other chips than the trainer: each side's own reports decide"}
    fns, hbm = result["functions"], result["hbm_gib"]
    P_s, KV, P_t = (result["sampler_params_per_chip_bytes"], result["kv_cache"]["per_chip_bytes"],
                    result["trainer_state_per_chip_bytes"])
    phases = {
        "update": None if rl_update_peak_bytes is None else int(rl_update_peak_bytes) + P_s + KV,
        "prefill": None if _peak(fns.get("sampler_prefill")) is None else _peak(fns["sampler_prefill"]) + P_t,
        "decode": None if _peak(fns.get("sampler_decode")) is None else _peak(fns["sampler_decode"]) + P_t,
        "sync": (None if _peak(fns.get("weight_sync")) is None
                 else _peak(fns["weight_sync"]) + (P_t - synced_trainer_bytes) + P_s + KV),
    }
    refused = [k for k in ("sampler_prefill", "sampler_decode", "weight_sync")
               if k in fns and not fns[k].get("compiled")]
    known = {k: v for k, v in phases.items() if v is not None}
    if refused:
        fits = False
    elif hbm is None or len(known) < len(phases):
        fits = None
    else:
        fits = all(v / GIB <= hbm for v in known.values())
    return {"applies": True, "phases_gib": {k: None if v is None else round(v / GIB, 2) for k, v in phases.items()},
            "rl_update_peak_gib": None if rl_update_peak_bytes is None else round(rl_update_peak_bytes / GIB, 2),
            "refused": refused, "fits": fits}
