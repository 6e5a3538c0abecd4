"""Building models: abstractly (no allocation), or initialised straight into their sharded layout."""
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from klong_jax.models.config import ModelConfig
from klong_jax.models.glm4_moe import Glm4MoeForCausalLM
from klong_jax.sharding import DEFAULT_RULES, MESH_AXES, state_shardings


def abstract_model(cfg: ModelConfig) -> Glm4MoeForCausalLM:
    """The model with ShapeDtypeStruct leaves: for planning, sharding and checkpoint restore targets."""
    return nnx.eval_shape(lambda: Glm4MoeForCausalLM(cfg, rngs=nnx.Rngs(0)))


def model_shardings(cfg: ModelConfig, mesh, rules=DEFAULT_RULES):
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    return graphdef, abstract_state, state_shardings(abstract_state, mesh, rules)


def model_layout(cfg: ModelConfig, mesh=None, rules=None):
    """graphdef, abstract state and target shardings of the model of `cfg`: on `mesh` under `rules`
    (default DEFAULT_RULES), or all on the first device when mesh is None."""
    if mesh is not None:
        return model_shardings(cfg, mesh, DEFAULT_RULES if rules is None else rules)
    one = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape((1,) * len(MESH_AXES)), MESH_AXES)
    graphdef, abstract_state, shardings = model_shardings(cfg, one)
    return graphdef, abstract_state, jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), shardings)


def init_model(cfg: ModelConfig, mesh=None, *, seed: int = 0, rules=DEFAULT_RULES) -> Glm4MoeForCausalLM:
    """Random init. With a mesh, each parameter is created directly in its shard (one jit, no host copy)."""
    if mesh is None:
        return Glm4MoeForCausalLM(cfg, rngs=nnx.Rngs(seed))
    graphdef, _, shardings = model_shardings(cfg, mesh, rules)

    @jax.jit
    def make():
        return nnx.split(Glm4MoeForCausalLM(cfg, rngs=nnx.Rngs(seed)))[1]

    with jax.set_mesh(mesh):
        state = jax.jit(make, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def count_params(cfg: ModelConfig) -> dict:
    """Total parameters, and parameters active per token (without embeddings and lm_head: V * D each, one
    matrix when they are tied)."""
    _, state, _ = nnx.split(abstract_model(cfg), nnx.Param, ...)
    flat = nnx.to_flat_state(state)
    total = sum(math.prod(v.shape) for _, v in flat)
    embed = (1 if cfg.tie_word_embeddings else 2) * cfg.vocab_size * cfg.hidden_size
    expert_params = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    inactive = cfg.num_moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert_params
    return {"total_params": int(total), "active_params_per_token": int(total - inactive - embed),
            "active_params_per_token_with_embeddings": int(total - inactive)}
