"""Creating, sharding and restoring the SFT train state."""
import logging
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from klong_jax.models import init_model
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


def initial_model(model_cfg, mesh, *, init_from: str, seed: int):
    """Random init, or weights from a Hugging Face directory or an Orbax model checkpoint."""
    if not init_from:
        return init_model(model_cfg, mesh, seed=seed)
    runtime = {k: getattr(model_cfg, k) for k in ("dtype", "param_dtype", "attention_impl", "moe_impl",
                                                  "remat_policy", "scan_layers")}
    if os.path.exists(os.path.join(init_from, "config.json")):
        from klong_jax.hf import load_pretrained
        log.info("initialising from Hugging Face checkpoint %s", init_from)
        return load_pretrained(init_from, mesh=mesh, **runtime)
    from klong_jax.model_checkpoint import load_model
    log.info("initialising from Orbax checkpoint %s", init_from)
    return load_model(init_from, mesh, **runtime)


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
