"""GLM-4.5(-Air) decoder: `Glm4MoeForCausalLM` in Flax NNX.

Data flow: embed -> [dense decoder layers] -> [MoE decoder layers] -> final RMSNorm -> lm_head.
Each group of identical layers is one stacked module (leading `layers` axis), run by `lax.scan`
(or an unrolled loop), with the configured rematerialisation policy around each layer.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from klong_jax.models.attention import Attention
from klong_jax.models.config import ModelConfig
from klong_jax.models.layers import MLP, RMSNorm, dtype_of, param, rope_cos_sin
from klong_jax.models.moe import MoE
from klong_jax.sharding import constrain


class DecoderLayer(nnx.Module):
    """Pre-norm: h = x + attn(norm(x)); y = h + ffn(norm(h)). ffn is a dense MLP or the MoE block."""

    def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs):
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdtype, rngs=rngs)
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdtype,
                                                rngs=rngs)
        if moe:
            self.mlp = MoE(cfg, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, param_dtype=pdtype,
                           std=cfg.initializer_range, rngs=rngs)
        self.is_moe = moe

    def __call__(self, x_BTD, cos, sin, doc_ids_BT, window_ids_BT, forced_experts_BTK=None):
        h_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos, sin, doc_ids_BT=doc_ids_BT,
                                       window_ids_BT=window_ids_BT).astype(x_BTD.dtype)
        ffn_in = self.post_attention_layernorm(h_BTD)
        if self.is_moe:
            y_BTD, experts_BTK = self.mlp(ffn_in, forced_experts_BTK)
        else:
            y_BTD, experts_BTK = self.mlp(ffn_in), None
        out_BTD = constrain(h_BTD + y_BTD.astype(h_BTD.dtype), ("batch", "seq", "act_embed"))
        return out_BTD, experts_BTK


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    policies = {
        "full": None,
        "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        "save_attention_inputs": jax.checkpoint_policies.save_only_these_names("attn_q", "attn_k", "attn_v"),
    }
    return jax.checkpoint(fn, policy=policies[policy], prevent_cse=False)


def _stack_layers(cfg: ModelConfig, n: int, moe: bool, rngs: nnx.Rngs):
    """n identical layers as one module whose variables carry a leading `layers` axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
        return DecoderLayer(cfg, moe=moe, rngs=r)

    stack = make(rngs)
    for _, var in nnx.iter_graph(stack):
        if isinstance(var, nnx.Variable):
            var.set_metadata(logical_axes=("layers",) + tuple(var.get_metadata()["logical_axes"]))
    return stack


class Glm4MoeForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdtype = dtype_of(cfg.param_dtype)
        self.cfg = cfg
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdtype,
                                  std=cfg.initializer_range)
        self.dense_layers = _stack_layers(cfg, cfg.num_dense_layers, False, rngs) if cfg.num_dense_layers else None
        self.moe_layers = _stack_layers(cfg, cfg.num_moe_layers, True, rngs) if cfg.num_moe_layers else None
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdtype, rngs=rngs)
        self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pdtype,
                             std=cfg.initializer_range)

    def _run_stack(self, stack, x_BTD, cos, sin, doc_ids_BT, window_ids_BT, forced_LBTK):
        graphdef, state = nnx.split(stack)

        def body(x, xs):
            layer_state, forced = xs
            layer = nnx.merge(graphdef, layer_state)
            return layer(x, cos, sin, doc_ids_BT, window_ids_BT, forced)

        body = _remat(body, self.cfg.remat_policy)
        n = jax.tree.leaves(state)[0].shape[0]
        if self.cfg.scan_layers:
            return jax.lax.scan(body, x_BTD, (state, forced_LBTK))
        routed = []
        for i in range(n):
            xs = jax.tree.map(lambda a: a[i], (state, forced_LBTK))
            x_BTD, r = body(x_BTD, xs)
            routed.append(r)
        return x_BTD, (None if routed[0] is None else jnp.stack(routed))

    def hidden_states(self, input_ids_BT, *, positions_BT=None, doc_ids_BT=None, window_ids_BT=None,
                      forced_experts_LBTK=None):
        """Final-normed hidden states [B, T, D] and routed experts [L_moe, B, T, k] (None without MoE)."""
        cfg = self.cfg
        B, T = input_ids_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTD = jnp.take(self.embed_tokens[...], input_ids_BT, axis=0).astype(dtype_of(cfg.dtype))
        x_BTD = constrain(x_BTD, ("batch", "seq", "act_embed"))
        cos, sin = rope_cos_sin(positions_BT, cfg.rotary_dim, cfg.rope_theta)
        if self.dense_layers is not None:
            x_BTD, _ = self._run_stack(self.dense_layers, x_BTD, cos, sin, doc_ids_BT, window_ids_BT, None)
        routed_LBTK = None
        if self.moe_layers is not None:
            x_BTD, routed_LBTK = self._run_stack(self.moe_layers, x_BTD, cos, sin, doc_ids_BT,
                                                 window_ids_BT, forced_experts_LBTK)
        return self.norm(x_BTD), routed_LBTK

    def logits(self, h_BTD):
        """lm_head in the compute dtype, returned as float32 (callers may chunk over T to save memory)."""
        dtype = dtype_of(self.cfg.dtype)
        logits_BTV = h_BTD.astype(dtype) @ self.lm_head[...].astype(dtype)
        return constrain(logits_BTV.astype(jnp.float32), ("batch", "seq", "act_vocab"))

    def __call__(self, input_ids_BT, *, positions_BT=None, doc_ids_BT=None, window_ids_BT=None,
                 forced_experts_LBTK=None, return_routing: bool = False):
        """logits_BTV (float32); with return_routing, also the routed expert ids [L_moe, B, T, k]."""
        h_BTD, routed_LBTK = self.hidden_states(
            input_ids_BT, positions_BT=positions_BT, doc_ids_BT=doc_ids_BT, window_ids_BT=window_ids_BT,
            forced_experts_LBTK=forced_experts_LBTK)
        logits_BTV = self.logits(h_BTD)
        return (logits_BTV, routed_LBTK) if return_routing else logits_BTV
