"""Model weights as an Orbax checkpoint (multi-host: every process writes its own shards).

Layout: DIR/<step>/params (the nnx State of the model as a pytree) + DIR/<step>/model_config (JSON with
the HF config and our runtime fields), so a checkpoint restores onto any mesh without the source config.
"""
import dataclasses

import jax
import orbax.checkpoint as ocp
from flax import nnx

from klong_jax.models.config import ModelConfig, runtime_overrides, upgrade_legacy_fields
from klong_jax.models.init import model_shardings


def config_to_json(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["eos_token_id"] = list(d["eos_token_id"]) if isinstance(d["eos_token_id"], tuple) else d["eos_token_id"]
    return d


def config_from_json(d: dict, **runtime) -> ModelConfig:
    """ModelConfig of a saved model_config JSON, runtime fields overridden. Checkpoints written before the
    compute dtype was named `compute_dtype` hold it as "dtype" (it always meant the compute dtype)."""
    d = upgrade_legacy_fields(d)
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = tuple(d["eos_token_id"])
    d.update(runtime)
    return ModelConfig(**d)


def save_model(model, directory: str, step: int = 0) -> None:
    _, state = nnx.split(model)
    with ocp.CheckpointManager(directory) as mgr:
        mgr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.to_pure_dict(state)),
            model_config=ocp.args.JsonSave(config_to_json(model.cfg))))
        mgr.wait_until_finished()


def read_model_config(directory: str, step: int | None = None, **runtime) -> tuple[ModelConfig, int]:
    with ocp.CheckpointManager(directory) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: no Orbax checkpoint found")
        meta = mgr.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
    return config_from_json(meta["model_config"], **runtime), step


def load_model(directory: str, mesh, *, step: int | None = None, rules=None, param_dtype=None,
               compute_dtype=None, **runtime):
    """Restore onto `mesh` (any shape: Orbax reshards), with optional runtime overrides: param_dtype
    (storage), compute_dtype (activations), attention_impl, ... (`dtype=` raises TypeError)."""
    runtime = runtime_overrides("load_model", dict(runtime, param_dtype=param_dtype, compute_dtype=compute_dtype))
    cfg, step = read_model_config(directory, step, **runtime)
    graphdef, abstract_state, shardings = model_shardings(cfg, mesh, *(() if rules is None else (rules,)))
    target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                          nnx.to_pure_dict(abstract_state), nnx.to_pure_dict(shardings))
    with ocp.CheckpointManager(directory) as mgr:
        restored = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    nnx.replace_by_pure_dict(abstract_state, restored["params"])
    return nnx.merge(graphdef, abstract_state)
