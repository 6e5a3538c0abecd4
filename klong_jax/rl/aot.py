"""An RL stage's update functions compiled ahead of time for a TPU topology from a CPU machine (libtpu installed,
no TPU), or for this process's own devices without one: `rl_update`, `old_logprobs` and `rl_minibatch` through the
loop's own jit wrappers and shardings, nothing allocated (launch/plan.py with an RL config). The abstract run,
the mesh and the per-function memory report are the SFT plan's (klong_jax/training/aot.py). The rollout sampler's
functions, the weight sync and the colocated verdict are compiled by klong_jax/rl/rollout_aot.py."""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from klong_jax.data.packing import ROW_FIELDS
from klong_jax.models.from_config import model_config_from
from klong_jax.rl.config import RLConfig
from klong_jax.rl.step import jit_rl_fns, jit_rl_minibatch_update
from klong_jax.sharding import logical_to_spec
from klong_jax.training.aot import abstract_run, compile_report, config_mesh, hbm_gib, mesh_info, per_device_bytes
from klong_jax.training.checkpoint import abstract_with_shardings

RL_EXTRA_DTYPES = {"rl_mask": jnp.int32, "advantages": jnp.float32, "sampler_logprobs": jnp.float32}
RL_FUNCTIONS = ("rl_update", "old_logprobs", "rl_minibatch")
MINIBATCH_MICRO = 2   # micro-batches of the compiled `rl_minibatch` step (its memory is one micro-batch's + the sum)


def rl_abstract_batch(rl, model_cfg, mesh, *, with_old: bool) -> dict:
    """ShapeDtypeStructs of one RL batch of rl.batch_rows rows of rl.seq_len tokens, sharded as the loop puts it
    (rl/loop.py: `batch_spec`, and `routed` [B, T, L, k] with its trailing axes replicated)."""
    shape = (rl.batch_rows, rl.seq_len)
    spec = logical_to_spec(("batch", "seq"), shape, mesh)
    sh, routed_sh = NamedSharding(mesh, spec), NamedSharding(mesh, P(*spec, None, None))
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh) for k in ROW_FIELDS}
    batch.update({k: jax.ShapeDtypeStruct(shape, d, sharding=sh) for k, d in RL_EXTRA_DTYPES.items()})
    batch["routed"] = jax.ShapeDtypeStruct(shape + (model_cfg.num_moe_layers, model_cfg.num_experts_per_tok),
                                           jnp.int32, sharding=routed_sh)
    if with_old:
        batch["old_logprobs"] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh)
    return batch


def compile_rl_update(cfg, topology: str | None, functions=None) -> dict:
    """An RL stage config's (cfg.kind == "rl") update functions compiled for `topology` (None: this process's
    devices), through the loop's jit wrappers and shardings (rl/step.py jit_rl_fns / jit_rl_minibatch_update, the
    TrainablePlan's state layout, donated state): `rl_update` (one optimizer step on a batch), `old_logprobs` (the
    forward(s) before the update) and, when rl.minibatches > 0 (the loop then steps on the in-graph sum of a
    mini-batch's micro-batch gradients), `rl_minibatch` (that step over MINIBATCH_MICRO batches). functions: a
    subset of RL_FUNCTIONS (None: those). One report per function (`compile_report`); `fits` on top: every function
    fits."""
    rl = RLConfig.from_mapping(cfg.rl)
    if functions is None:
        functions = ("rl_update", "old_logprobs") + (("rl_minibatch",) if rl.minibatches else ())
    unknown = set(functions) - set(RL_FUNCTIONS)
    if unknown:
        raise ValueError(f"unknown RL functions {sorted(unknown)}; choose from {RL_FUNCTIONS}")
    model_cfg = model_config_from(cfg.model)
    mesh = config_mesh(cfg, topology)
    reports = {}
    with jax.set_mesh(mesh):
        run = abstract_run(cfg, model_cfg, mesh, rl.steps)
        state, layout = run.state, run.layout
        # The loop's jit wrappers and their arguments (rl/loop.py setup_stage, run_rl, update_policy).
        fn_args = (run.graphdef, run.tx, rl, run.lr_schedule, layout.state_sh, run.rest_sh, mesh)
        fn_kw = dict(temperature=float(cfg.agent.temperature), plan=run.plan, frozen_sh=layout.frozen_sh)
        # The KL reference is a copy of the trainable params only with kl_coef (rl/loop.py run_rl); without, the
        # loop passes state["params"] itself and the update never reads it.
        ref_params = abstract_with_shardings(layout.abs_trainable, layout.trainable_sh)
        ref_bytes = per_device_bytes(ref_params) if rl.kl_coef else 0
        batch = rl_abstract_batch(rl, model_cfg, mesh, with_old=True)
        old_batch = {k: v for k, v in batch.items() if k != "old_logprobs"}
        update_fn, old_fn = jit_rl_fns(*fn_args, **fn_kw)
        # Live on device during the forward-only / gradient calls but not their arguments: the optimizer state
        # and step (and, for the old log-probs, the KL reference).
        opt_bytes = per_device_bytes({"opt_state": state["opt_state"], "step": state["step"]})
        for name in functions:   # one at a time: lower, compile, report, drop
            if name == "rl_update":
                lowered = update_fn.lower(state, run.rest, ref_params, batch, run.frozen)
                reports[name] = compile_report(lowered, topology)
            elif name == "old_logprobs":
                lowered = old_fn.lower(state["params"], run.rest, old_batch, run.frozen)
                reports[name] = compile_report(lowered, topology, resident_bytes=opt_bytes + ref_bytes)
            else:
                minibatch_fn = jit_rl_minibatch_update(*fn_args, **fn_kw)
                total = jax.ShapeDtypeStruct((), jnp.float32)
                lowered = minibatch_fn.lower(state, run.rest, ref_params, (batch,) * MINIBATCH_MICRO, total,
                                             run.frozen)
                reports[name] = compile_report(lowered, topology)
            del lowered
    return {**mesh_info(topology, mesh, model_cfg), "kind": "rl", "seq_len": rl.seq_len,
            "batch_rows": rl.batch_rows, "loss_chunk": rl.loss_chunk, "routing_replay": rl.routing_replay,
            "replay_gap": rl.replay_gap, "kl_coef": rl.kl_coef, "minibatches": rl.minibatches,
            "trainable": run.plan.config.spec(), "hbm_gib": hbm_gib(topology),
            "fits": all(r["fits"] for r in reports.values()), "functions": reports}
