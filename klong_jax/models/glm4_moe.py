"""GLM-4.5(-Air) decoder: `Glm4MoeForCausalLM` in Flax NNX; also the dense Llama family (llama, qwen2,
qwen3: every layer dense, see ModelConfig.model_type).

Data flow: embed -> [dense decoder layers] -> [MoE decoder layers] -> final RMSNorm -> lm_head
(`tie_word_embeddings`: no lm_head variable, logits = h @ embed_tokens.T).
Each group of identical layers is one stacked module (leading `layers` axis), run by `lax.scan`
(or an unrolled loop), with the configured rematerialisation policy around each layer.

Inference with a KV cache (`init_cache`, `prefill`, `decode_step`): the cache is a pytree
{"dense": {"k", "v"} | None, "moe": {"k", "v"} | None}, each array [L, B, S, K, H] in the compute dtype
with logical axes CACHE_AXES; the layer loop carries each layer's slice as scan xs and returns only
the new tokens' k/v as ys, written into the stacked cache once per step (in place under donation).

Shape letters: see klong_jax/models/__init__.py (L the layers of one stack, X experts per token).
"""

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from klong_jax.models.attention import Attention
from klong_jax.models.config import ModelConfig
from klong_jax.models.layers import MLP, RMSNorm, dtype_of, param, rope_cos_sin
from klong_jax.models.moe import MoE
from klong_jax.sharding import constrain

# Logical axes of a cache array [L, B, S, K, H]: batch and kv heads shard like the activations.
CACHE_AXES = ("layers", "batch", "seq", "act_kv_heads", None)


class DecoderLayer(nnx.Module):
    """Pre-norm: h = x + attn(norm(x)); y = h + ffn(norm(h)). ffn is a dense MLP or the MoE block."""

    def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs):
        dtype, pdtype = dtype_of(cfg.compute_dtype), dtype_of(cfg.param_dtype)
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

    @jax.named_scope("decoder_layer")
    def __call__(self, x_BTD, cos, sin, doc_ids_BT, window_ids_BT, forced_experts_BTX=None):
        h_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos, sin, doc_ids_BT=doc_ids_BT,
                                       window_ids_BT=window_ids_BT).astype(x_BTD.dtype)
        return self._ffn(h_BTD, forced_experts_BTX)

    def _ffn(self, h_BTD, forced_experts_BTX=None):
        ffn_in = self.post_attention_layernorm(h_BTD)
        if self.is_moe:
            y_BTD, experts_BTX = self.mlp(ffn_in, forced_experts_BTX)
        else:
            y_BTD, experts_BTX = self.mlp(ffn_in), None
        out_BTD = constrain(h_BTD + y_BTD.astype(h_BTD.dtype), ("batch", "seq", "act_embed"))
        return out_BTD, experts_BTX

    @jax.named_scope("decoder_layer")
    def prefill(self, x_BTD, cos, sin, doc_ids_BT):
        """`__call__` (no windows, no replay) that also returns the layer's k/v [B, T, K, H]."""
        attn_BTD, k_BTKH, v_BTKH = self.self_attn.attend_prefill(self.input_layernorm(x_BTD), cos, sin,
                                                                 doc_ids_BT=doc_ids_BT)
        out_BTD, experts_BTX = self._ffn(x_BTD + attn_BTD.astype(x_BTD.dtype))
        return out_BTD, experts_BTX, k_BTKH, v_BTKH

    @jax.named_scope("decoder_layer")
    def decode(self, x_BTD, cos, sin, cache_k_BSKH, cache_v_BSKH, write_index, mask_BTS):
        """New tokens against this layer's cache; returns (out, experts, k_new, v_new)."""
        attn_BTD, k_BTKH, v_BTKH = self.self_attn.attend_cached(
            self.input_layernorm(x_BTD), cos, sin, cache_k_BSKH, cache_v_BSKH, write_index, mask_BTS)
        out_BTD, experts_BTX = self._ffn(x_BTD + attn_BTD.astype(x_BTD.dtype))
        return out_BTD, experts_BTX, k_BTKH, v_BTKH


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
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pdtype,
                                 std=cfg.initializer_range)

    def _run_stack(self, stack, x_BTD, cos, sin, doc_ids_BT, window_ids_BT, forced_LBTX):
        graphdef, state = nnx.split(stack)

        def body(x, xs):
            layer_state, forced = xs
            layer = nnx.merge(graphdef, layer_state)
            return layer(x, cos, sin, doc_ids_BT, window_ids_BT, forced)

        body = _remat(body, self.cfg.remat_policy)
        n = jax.tree.leaves(state)[0].shape[0]
        if self.cfg.scan_layers:
            return jax.lax.scan(body, x_BTD, (state, forced_LBTX))
        routed = []
        for i in range(n):
            xs = jax.tree.map(lambda a: a[i], (state, forced_LBTX))
            x_BTD, r = body(x_BTD, xs)
            routed.append(r)
        return x_BTD, (None if routed[0] is None else jnp.stack(routed))

    def hidden_states(self, input_ids_BT, *, positions_BT=None, doc_ids_BT=None, window_ids_BT=None,
                      forced_experts_LBTX=None, stack_pieces=None):
        """Final-normed hidden states [B, T, D] and routed experts [L, B, T, X] over the MoE layers (None
        without MoE).

        stack_pieces: optional {"dense": [stack, ...], "moe": [stack, ...]}: a stack given as consecutive
        pieces along its `layers` axis (modules of the stack's structure holding layers [0, k1), [k1, k2), ...,
        in order), run piece after piece in place of the model's own stack; forced experts are sliced to each
        piece and the routing concatenated. The same layers in the same order: the result equals the unsplit
        stack's. A piece whose variables are constants to a caller's differentiation is thus never
        differentiated through (each piece is its own scan).
        """
        cfg = self.cfg
        B, T = input_ids_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTD, cos, sin = self._embed(input_ids_BT, positions_BT)
        pieces = dict(stack_pieces or {})
        if self.dense_layers is not None:
            for stack in pieces.get("dense", [self.dense_layers]):
                x_BTD, _ = self._run_stack(stack, x_BTD, cos, sin, doc_ids_BT, window_ids_BT, None)
        routed_LBTX = None
        if self.moe_layers is not None:
            routed, lo, stacks = [], 0, pieces.get("moe", [self.moe_layers])
            for stack in stacks:
                n = jax.tree.leaves(nnx.state(stack))[0].shape[0]
                forced = forced_experts_LBTX
                if forced is not None and len(stacks) > 1:
                    forced = forced[lo:lo + n]
                x_BTD, r = self._run_stack(stack, x_BTD, cos, sin, doc_ids_BT, window_ids_BT, forced)
                routed.append(r)
                lo += n
            routed_LBTX = routed[0] if len(routed) == 1 else jnp.concatenate(routed, axis=0)
        return self.norm(x_BTD), routed_LBTX

    def logits(self, h_BTD):
        """logits_BTV = h_BTD @ W_DV in the compute dtype, returned as float32 (callers may chunk over T to
        save memory). W_DV is lm_head, or embed_tokens.T when the embeddings are tied."""
        dtype = dtype_of(self.cfg.compute_dtype)
        h = h_BTD.astype(dtype)
        if self.cfg.tie_word_embeddings:
            logits_BTV = jnp.einsum("BTD,VD->BTV", h, self.embed_tokens[...].astype(dtype))
        else:
            logits_BTV = h @ self.lm_head[...].astype(dtype)
        return constrain(logits_BTV.astype(jnp.float32), ("batch", "seq", "act_vocab"))

    def __call__(self, input_ids_BT, *, positions_BT=None, doc_ids_BT=None, window_ids_BT=None,
                 forced_experts_LBTX=None, return_routing: bool = False, stack_pieces=None):
        """logits_BTV (float32); with return_routing, also the routed expert ids [L, B, T, X]
        over the MoE layers.
        stack_pieces: as in `hidden_states`."""
        h_BTD, routed_LBTX = self.hidden_states(
            input_ids_BT, positions_BT=positions_BT, doc_ids_BT=doc_ids_BT, window_ids_BT=window_ids_BT,
            forced_experts_LBTX=forced_experts_LBTX, stack_pieces=stack_pieces)
        logits_BTV = self.logits(h_BTD)
        return (logits_BTV, routed_LBTX) if return_routing else logits_BTV

    # ------------------------------------------------------------------------------------------
    # Inference with a KV cache

    def _stacks(self):
        return (("dense", self.dense_layers), ("moe", self.moe_layers))

    def _loop_layers(self, stack, x_BTD, xs, step):
        """x through every layer of `stack`: step(layer, x, xs_l) -> (x, ys_l); ys stacked over layers."""
        graphdef, state = nnx.split(stack)

        def body(x, layer_xs):
            layer_state, xs_l = layer_xs
            return step(nnx.merge(graphdef, layer_state), x, xs_l)

        if self.cfg.scan_layers:
            return jax.lax.scan(body, x_BTD, (state, xs))
        ys = []
        for i in range(jax.tree.leaves(state)[0].shape[0]):
            x_BTD, y = body(x_BTD, jax.tree.map(lambda a: a[i], (state, xs)))
            ys.append(y)
        return x_BTD, jax.tree.map(lambda *a: jnp.stack(a), *ys)

    def _embed(self, input_ids_BT, positions_BT):
        cfg = self.cfg
        x_BTD = jnp.take(self.embed_tokens[...], input_ids_BT, axis=0).astype(dtype_of(cfg.compute_dtype))
        cos, sin = rope_cos_sin(positions_BT, cfg.rotary_dim, cfg.rope_theta)
        return constrain(x_BTD, ("batch", "seq", "act_embed")), cos, sin

    def init_cache(self, batch: int, cache_len: int, cache_dtype=None) -> dict:
        """A zeroed KV cache of `cache_len` slots per row (cache_dtype: the compute dtype by default)."""
        cfg = self.cfg
        dtype = dtype_of(cfg.compute_dtype) if cache_dtype is None else jnp.dtype(cache_dtype)
        cache = {}
        for name, stack in self._stacks():
            if stack is None:
                cache[name] = None
                continue
            n = jax.tree.leaves(nnx.state(stack))[0].shape[0]
            shape = (n, batch, cache_len, cfg.num_key_value_heads, cfg.head_dim)
            cache[name] = {kv: constrain(jnp.zeros(shape, dtype), CACHE_AXES) for kv in ("k", "v")}
        return cache

    def prefill(self, input_ids_BT, *, cache_len: int, positions_BT=None, doc_ids_BT=None, cache_dtype=None):
        """T prompt tokens through the configured attention kernel; starts a cache of `cache_len` slots
        holding their k/v in slots [0, T).

        Padding tokens carry doc id 0 (they attend to nothing and nothing attends to them). Returns
        (final-normed hidden states h_BTD, cache, routed experts [L, B, T, X] of the MoE layers or None): the caller
        takes logits of the positions it needs (`self.logits`), never [B, T, V] for a long prompt.
        """
        cfg = self.cfg
        B, T = input_ids_BT.shape
        if cache_len < T:
            raise ValueError(f"cache_len={cache_len} is shorter than the prompt ({T} tokens)")
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTD, cos, sin = self._embed(input_ids_BT, positions_BT)
        dtype = dtype_of(cfg.compute_dtype) if cache_dtype is None else jnp.dtype(cache_dtype)
        cache, routed_LBTX = {}, None

        def step(layer, x, _):
            out, experts, k, v = layer.prefill(x, cos, sin, doc_ids_BT)
            return out, (experts, k, v)

        for name, stack in self._stacks():
            if stack is None:
                cache[name] = None
                continue
            x_BTD, (routed, k_LBTKH, v_LBTKH) = self._loop_layers(stack, x_BTD, None, step)
            pad = ((0, 0), (0, 0), (0, cache_len - T), (0, 0), (0, 0))
            cache[name] = {kv: constrain(jnp.pad(a.astype(dtype), pad), CACHE_AXES)
                           for kv, a in (("k", k_LBTKH), ("v", v_LBTKH))}
            if name == "moe":
                routed_LBTX = routed
        return self.norm(x_BTD), cache, routed_LBTX

    def decode_step(self, input_ids_BT, cache, *, positions_BT, write_index, kv_valid_BS):
        """T new tokens per row (T = 1 when decoding) at cache slots [write_index, write_index + T).

        positions_BT: their RoPE positions (per row: left-padded rows start later in the cache than
        their position 0). kv_valid_BS: False at padding slots. A query at slot s attends to the valid
        slots <= s. Returns (logits_BTV float32, updated cache, routed experts [L, B, T, X] or None).
        """
        B, T = input_ids_BT.shape
        S = next(c["k"].shape[2] for c in cache.values() if c is not None)
        x_BTD, cos, sin = self._embed(input_ids_BT, positions_BT)
        mask_BTS = kernels.attention_mask(
            jnp.ones((B, T), jnp.int32), None, T, S, causal=True,
            q_positions_BT=(write_index + jnp.arange(T, dtype=jnp.int32))[None, :],
            k_positions_BS=jnp.arange(S, dtype=jnp.int32)[None, :], kv_doc_ids_BS=kv_valid_BS.astype(jnp.int32))

        def step(layer, x, kv):
            out, experts, k, v = layer.decode(x, cos, sin, kv["k"], kv["v"], write_index, mask_BTS)
            return out, (experts, k, v)

        new_cache, routed_LBTX = {}, None
        for name, stack in self._stacks():
            if stack is None:
                new_cache[name] = None
                continue
            x_BTD, (routed, k_LBTKH, v_LBTKH) = self._loop_layers(stack, x_BTD, cache[name], step)
            new_cache[name] = {
                kv: constrain(jax.lax.dynamic_update_slice_in_dim(cache[name][kv], new, write_index, axis=2),
                              CACHE_AXES)
                for kv, new in (("k", k_LBTKH), ("v", v_LBTKH))}
            if name == "moe":
                routed_LBTX = routed
        return self.logits(self.norm(x_BTD)), new_cache, routed_LBTX
