"""Sparse upcycling: a dense model's last layers become MoE layers whose experts all start as copies of
that layer's FFN (Komatsuzaki et al., "Sparse Upcycling", 2022).

For an upcycled layer with E experts, top-X routing and renormalised weights (norm_topk_prob, scaling 1):

    y = sum_{x < X} w_x * FFN_{e_x}(h),   w_x = s_{e_x} / sum_{x'} s_{e_x'}   so   sum_x w_x = 1,

and with every FFN_e equal to the dense FFN, y = FFN(h): at initialisation the upcycled model computes
the dense model's logits whatever the (fresh, random) router chooses. Training then lets the experts
drift apart. No shared expert is added (it would change the function at init).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from klong_jax.models.config import ModelConfig
from klong_jax.models.init import model_layout


@dataclasses.dataclass(frozen=True)
class UpcycleConfig:
    """layers: how many of the last dense layers become MoE layers (0: off). experts: E routed experts per
    upcycled layer; top_k: X experts per token; router_std: std of the fresh router's normal init;
    seed: of the router init."""
    layers: int = 0
    experts: int = 8
    top_k: int = 2
    router_std: float = 0.02
    seed: int = 0

    def __post_init__(self):
        for name in ("layers", "experts", "top_k", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"upcycle.{name}={value!r} must be an integer")
        if self.layers < 0:
            raise ValueError(f"upcycle.layers={self.layers} must be >= 0 (0 turns upcycling off)")
        if self.experts < 1:
            raise ValueError(f"upcycle.experts={self.experts} must be >= 1")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"upcycle.top_k={self.top_k} must be in [1, experts={self.experts}]")
        if not (isinstance(self.router_std, (int, float)) and math.isfinite(self.router_std)
                and self.router_std >= 0):
            raise ValueError(f"upcycle.router_std={self.router_std!r} must be a finite number >= 0")

    @property
    def enabled(self) -> bool:
        return self.layers > 0


def upcycled_config(dense_cfg: ModelConfig, up: UpcycleConfig) -> ModelConfig:
    """The config of `dense_cfg` with its last `up.layers` layers turned into MoE layers.

    first_k_dense_replace = L - layers; E = experts, X = top_k, expert width = the dense FFN width, no
    shared expert, renormalised top-k weights with scale 1, no expert groups. The result is a
    model_type 'glm4_moe' (the HF class that holds dense and MoE layers; llama/qwen attention maps onto
    it: attention_bias, use_qk_norm and partial_rotary_factor=1.0 carry over).
    """
    L = dense_cfg.num_hidden_layers
    if dense_cfg.num_moe_layers:
        raise ValueError(f"upcycle: the model already has {dense_cfg.num_moe_layers} MoE layers "
                         f"(first_k_dense_replace={dense_cfg.first_k_dense_replace} < num_hidden_layers={L}); "
                         "upcycling starts from a dense model")
    if not 0 < up.layers <= L:
        raise ValueError(f"upcycle.layers={up.layers} must be in [1, num_hidden_layers={L}] to upcycle")
    return dense_cfg.replace(
        model_type="glm4_moe", first_k_dense_replace=L - up.layers, n_routed_experts=up.experts,
        num_experts_per_tok=up.top_k, moe_intermediate_size=dense_cfg.intermediate_size, n_shared_experts=0,
        norm_topk_prob=True, routed_scaling_factor=1.0, n_group=1, topk_group=1, num_nextn_predict_layers=0)


def upcycle(dense_model, up: UpcycleConfig, *, mesh=None, rules=None):
    """The upcycled model of `dense_model` (a `Glm4MoeForCausalLM` whose layers are all dense), built
    variable by variable straight into its sharded layout on `mesh` (one device when None).

    Dense layer l < L - layers stays in the dense stack; layer L - layers + i becomes MoE layer i:
    attention and norms copied, every expert e: w_gate[i, e] = gate_proj[l], w_up[i, e] = up_proj[l],
    w_down[i, e] = down_proj[l]; router ~ N(0, router_std^2) from `seed`, router bias zeros. Embeddings,
    final norm and lm_head are copied. Each target variable is one jit whose output sharding is the
    target's, so the E-fold expert tensors are only ever materialised as their device shards.
    """
    cfg = upcycled_config(dense_model.cfg, up)
    n_dense = cfg.first_k_dense_replace
    graphdef, abstract_state, shardings = model_layout(cfg, mesh, rules)
    flat_target = dict(nnx.to_flat_state(abstract_state))
    flat_sharding = dict(nnx.to_flat_state(shardings))
    # The dense weights in their own layout on the target devices (a no-op when they are there already).
    _, _, src_shardings = model_layout(dense_model.cfg, mesh, rules)
    src_sharding = dict(nnx.to_flat_state(src_shardings))
    source = {path: jax.device_put(var.get_value(), src_sharding[path])
              for path, var in nnx.to_flat_state(nnx.state(dense_model))}
    router_key = jax.random.key(up.seed)

    def build(path, var):
        out_sharding, dtype = flat_sharding[path], var.dtype
        if path[0] == "moe_layers" and path[1:] == ("mlp", "router"):
            shape = var.shape  # [L, D, E]
            fn = lambda: (up.router_std * jax.random.normal(router_key, shape, jnp.float32)).astype(dtype)  # noqa: E731
            return jax.jit(fn, out_shardings=out_sharding)()
        if path[0] == "moe_layers" and path[1:] == ("mlp", "router_bias"):
            return jax.jit(lambda: jnp.zeros(var.shape, dtype), out_shardings=out_sharding)()
        if path[0] == "moe_layers" and path[1:2] == ("mlp",):
            dense_name = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}[path[2]]
            src_LDF = source[("dense_layers", "mlp", dense_name)]
            E = var.shape[1]

            def experts(w_LDF):  # [L, D, F] -> [L - n_dense, E, D, F]: the last `layers` layers, per expert
                tail_LDF = w_LDF[n_dense:]
                return jnp.broadcast_to(tail_LDF[:, None], (tail_LDF.shape[0], E) + tail_LDF.shape[1:]).astype(dtype)

            return jax.jit(experts, out_shardings=out_sharding)(src_LDF)
        if path[0] in ("dense_layers", "moe_layers"):
            rows = slice(0, n_dense) if path[0] == "dense_layers" else slice(n_dense, None)
            src = source[("dense_layers",) + path[1:]]
            return jax.jit(lambda w: w[rows].astype(dtype), out_shardings=out_sharding)(src)
        return jax.jit(lambda w: w.astype(dtype), out_shardings=out_sharding)(source[path])

    flat = [(path, var.replace(value=build(path, var))) for path, var in flat_target.items()]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


__all__ = ["UpcycleConfig", "upcycled_config", "upcycle"]
