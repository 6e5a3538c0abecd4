"""Creating, sharding and restoring the SFT train state."""
import logging
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from klong_jax.models import init_model
from klong_jax.models.config import RUNTIME_FIELDS
from klong_jax.models.upcycle import UpcycleConfig
from klong_jax.models.upcycle import upcycle as upcycle_model
from klong_jax.models.init import model_shardings
from klong_jax.training.checkpoint import abstract_with_shardings

log = logging.getLogger(__name__)


def split_model(model):
    """graphdef, trainable params (pure dict), everything else (pure dict: router bias)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def abstract_layout(model_cfg, mesh):
    """graphdef, abstract params / rest, and their shardings, without allocating anything."""
    graphdef, abstract_state, shardings = model_shardings(model_cfg, mesh)
    abstract_model = nnx.merge(graphdef, abstract_state)
    graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    flat_sh = dict(nnx.to_flat_state(shardings))
    p_sh = {path: flat_sh[path] for path, _ in nnx.to_flat_state(params)}
    r_sh = {path: flat_sh[path] for path, _ in nnx.to_flat_state(rest)}
    return (graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest),
            _unflatten(p_sh), _unflatten(r_sh))


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def initial_model(model_cfg, mesh, *, init_from: str, seed: int, upcycle=None):
    """The model a run starts from: random init of `model_cfg`, or the weights of `init_from` (a Hugging
    Face directory, a `*.gguf` file, an Orbax model checkpoint, or `pretrained:NAME`, a registered base fetched
    on first use: klong_jax/hf/pretrained.py) loaded with model_cfg's runtime fields.

    upcycle (UpcycleConfig): when it is on and the loaded model is still dense, its last `upcycle.layers`
    layers are upcycled into MoE layers (models/upcycle.py); a checkpoint that already has MoE layers (e.g.
    an upcycled run's output) is left as is. Then the loaded architecture must equal model_cfg's (the
    config.model section describes the final architecture): otherwise ValueError listing each field.
    """
    up = upcycle if upcycle is not None else UpcycleConfig()
    if not init_from:
        return init_model(model_cfg, mesh, seed=seed)
    from klong_jax.hf.pretrained import resolve_source
    init_from = resolve_source(init_from)  # pretrained:NAME -> the fetched, verified file
    runtime = {k: getattr(model_cfg, k) for k in RUNTIME_FIELDS}
    if init_from.endswith(".gguf"):
        from klong_jax.hf.gguf import load_gguf
        log.info("initialising from GGUF file %s", init_from)
        model = load_gguf(init_from, mesh=mesh, rules=None, **runtime)
    elif os.path.exists(os.path.join(init_from, "config.json")):
        from klong_jax.hf import load_pretrained
        log.info("initialising from Hugging Face checkpoint %s", init_from)
        model = load_pretrained(init_from, mesh=mesh, **runtime)
    else:
        from klong_jax.model_checkpoint import load_model
        log.info("initialising from Orbax checkpoint %s", init_from)
        model = load_model(init_from, mesh, **runtime)
    if up.enabled and model.cfg.num_moe_layers == 0:
        log.info("upcycling the last %d of %d dense layers to %d experts (top %d)", up.layers,
                 model.cfg.num_hidden_layers, up.experts, up.top_k)
        model = upcycle_model(model, up, mesh=mesh)
    check_architecture(model_cfg, model.cfg, source=init_from, upcycled=up.enabled)
    return model


def check_architecture(want, got, *, source: str, upcycled: bool = False) -> None:
    """ValueError listing every architecture field (ModelConfig.arch_dict) where the checkpoint's config
    `got` differs from the run's `want` (floats compared to a relative 1e-6: GGUF stores float32)."""
    a, b = want.arch_dict(), got.arch_dict()
    diffs = []
    for k in sorted(set(a) | set(b)):
        x, y = getattr(want, k), getattr(got, k)
        same = math.isclose(x, y, rel_tol=1e-6) if isinstance(x, float) and isinstance(y, float) else x == y
        if not same:
            diffs.append(f"{k}: config {x!r} vs checkpoint {y!r}")
    if diffs:
        what = "checkpoint (after upcycling)" if upcycled and got.num_moe_layers else "checkpoint"
        raise ValueError(f"init_from={source}: the {what} architecture differs from config.model in "
                         f"{len(diffs)} field(s): " + "; ".join(diffs)
                         + ". Make config.model describe the checkpoint (plus its upcycle section).")


def replicated(mesh):
    return NamedSharding(mesh, P())


def new_state(params, tx, state_sh):
    opt_state = jax.jit(tx.init, out_shardings=state_sh["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), state_sh["step"])
    return {"params": params, "opt_state": opt_state, "step": step}


def abstract_state(abstract_params, tx, state_sh):
    abstract = {"params": abstract_params, "opt_state": jax.eval_shape(tx.init, abstract_params),
                "step": jax.ShapeDtypeStruct((), jnp.int32)}
    return abstract_with_shardings(abstract, state_sh)


def load_trained_model(workdir: str, model_cfg, mesh, step: int | None = None):
    """The model (params + router bias) of a training workdir's checkpoint (SFT or RL), onto `mesh`.

    Only params and `rest` are read (Orbax partial restore), so the optimizer that wrote the checkpoint
    does not matter: each RL stage starts a fresh optimizer from the previous stage's weights.
    """
    import orbax.checkpoint as ocp
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if step is None:
        steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(ckpt_dir) else []
        if not steps:
            raise FileNotFoundError(f"{workdir}: no complete training checkpoint under {ckpt_dir}")
        step = steps[-1]
    graphdef, abs_params, abs_rest, param_sh, rest_sh = abstract_layout(model_cfg, mesh)
    target = {"train": {"params": abstract_with_shardings(abs_params, param_sh)},
              "rest": abstract_with_shardings(abs_rest, rest_sh)}
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(ckpt_dir, str(step), "state"),
        args=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                    partial_restore=True))
    log.info("loaded step %d of %s", step, workdir)
    return nnx.merge(graphdef, restored["train"]["params"], restored["rest"]), step
