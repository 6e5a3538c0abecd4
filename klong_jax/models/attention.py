"""GQA self-attention with q/k/v bias, optional per-head qk RMSNorm and partial NeoX RoPE.

Besides the training call, two inference paths for a KV cache: `attend_prefill` (the training call that
also hands back k/v for the cache) and `attend_cached` (new tokens against a cache under an explicit mask).
Shape letters: see klong_jax/models/__init__.py (N query heads, K kv heads, H head dim, R rotary dims).
"""
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

import kernels
from kernels.cached import cached_attention
from klong_jax.models.layers import RMSNorm, apply_rope, param
from klong_jax.sharding import constrain

# attend_cached: up to this many new tokens per call read the cache in place (kernels.cached_attention,
# decoding's T = 1); longer chunks attend over a copy with their k/v written in (faster for them on CPU:
# cached_attention does K times the useful multiply-adds, K the kv heads).
CACHED_SMALL_T = 8


class Attention(nnx.Module):
    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        std = cfg.initializer_range
        # q_proj [D, N, H], k_proj / v_proj [D, K, H], o_proj [N, H, D]; biases [N, H] / [K, H].
        self.q_proj = param(rngs, (D, N, H), ("embed", "heads", "head_dim"), param_dtype, std=std)
        self.k_proj = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), param_dtype, std=std)
        self.v_proj = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), param_dtype, std=std)
        self.o_proj = param(rngs, (N, H, D), ("heads", "head_dim", "embed"), param_dtype, std=std)
        if cfg.attention_bias:
            self.q_bias = param(rngs, (N, H), ("heads", "head_dim"), param_dtype, init="zeros")
            self.k_bias = param(rngs, (K, H), ("kv_heads", "head_dim"), param_dtype, init="zeros")
            self.v_bias = param(rngs, (K, H), ("kv_heads", "head_dim"), param_dtype, init="zeros")
        if cfg.use_qk_norm:
            self.q_norm = RMSNorm(H, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
            self.k_norm = RMSNorm(H, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.use_bias, self.use_qk_norm = cfg.attention_bias, cfg.use_qk_norm
        self.impl, self.scale, self.dtype = cfg.attention_impl, H ** -0.5, dtype

    def project_qkv(self, x_BTD, cos_BTR, sin_BTR):
        x = x_BTD.astype(self.dtype)
        q_BTNH = jnp.einsum("BTD,DNH->BTNH", x, self.q_proj[...].astype(self.dtype))
        k_BTKH = jnp.einsum("BTD,DKH->BTKH", x, self.k_proj[...].astype(self.dtype))
        v_BTKH = jnp.einsum("BTD,DKH->BTKH", x, self.v_proj[...].astype(self.dtype))
        if self.use_bias:
            q_BTNH = q_BTNH + self.q_bias[...].astype(self.dtype)
            k_BTKH = k_BTKH + self.k_bias[...].astype(self.dtype)
            v_BTKH = v_BTKH + self.v_bias[...].astype(self.dtype)
        if self.use_qk_norm:
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        q_BTNH = apply_rope(q_BTNH, cos_BTR, sin_BTR)
        k_BTKH = apply_rope(k_BTKH, cos_BTR, sin_BTR)
        # Named so the save_attention_inputs remat policy can keep exactly these.
        q_BTNH = checkpoint_name(constrain(q_BTNH, ("batch", "seq", "act_heads", None)), "attn_q")
        k_BTKH = checkpoint_name(constrain(k_BTKH, ("batch", "seq", "act_kv_heads", None)), "attn_k")
        v_BTKH = checkpoint_name(constrain(v_BTKH, ("batch", "seq", "act_kv_heads", None)), "attn_v")
        return q_BTNH, k_BTKH, v_BTKH

    def output(self, o_BTNH):
        # "BTNH,NHD->BTD" as a dot_general: jnp.einsum would contract its letters in sorted order (H, N),
        # against their order in memory, and so transpose both operands.
        return jax.lax.dot_general(o_BTNH.astype(self.dtype), self.o_proj[...].astype(self.dtype),
                                   (((2, 3), (0, 1)), ((), ())), preferred_element_type=self.dtype)

    @jax.named_scope("attention")
    def __call__(self, x_BTD, cos_BTR, sin_BTR, *, doc_ids_BT=None, window_ids_BT=None):
        q_BTNH, k_BTKH, v_BTKH = self.project_qkv(x_BTD, cos_BTR, sin_BTR)
        o_BTNH = kernels.attention(q_BTNH, k_BTKH, v_BTKH, impl=self.impl, doc_ids=doc_ids_BT,
                                   window_ids=window_ids_BT, causal=True, sm_scale=self.scale)
        return self.output(o_BTNH)

    @jax.named_scope("attention")
    def attend_prefill(self, x_BTD, cos_BTR, sin_BTR, *, doc_ids_BT=None):
        """`__call__` (the configured kernel) that also returns this layer's k/v [B, T, K, H] for a cache."""
        q_BTNH, k_BTKH, v_BTKH = self.project_qkv(x_BTD, cos_BTR, sin_BTR)
        o_BTNH = kernels.attention(q_BTNH, k_BTKH, v_BTKH, impl=self.impl, doc_ids=doc_ids_BT,
                                   causal=True, sm_scale=self.scale)
        return self.output(o_BTNH), k_BTKH, v_BTKH

    @jax.named_scope("attention")
    def attend_cached(self, x_BTD, cos_BTR, sin_BTR, cache_k_BSKH, cache_v_BSKH, write_index, mask_BTS):
        """T new tokens against a KV cache of S slots.

        Their k/v go to slots [write_index, write_index + T) (clamped into the cache as
        dynamic_update_slice clamps) and the queries attend over all S slots under mask_BTS (which must
        hide unwritten and padding slots), as if the new k/v were written there first. Returns
        (output [B, T, D], k_new [B, T, K, H], v_new): the caller writes k_new/v_new into the stacked
        cache. For T <= CACHED_SMALL_T (decoding) nothing is written here: the cache, write slots
        masked out, and the new k/v are two parts of one softmax (kernels.cached_attention), reading the
        cache in place; longer chunks attend over a copy of the cache with the new k/v written in
        (kernels.reference_attention), whose cost the T queries amortise.
        """
        q_BTNH, k_BTKH, v_BTKH = self.project_qkv(x_BTD, cos_BTR, sin_BTR)
        k_BTKH, v_BTKH = k_BTKH.astype(cache_k_BSKH.dtype), v_BTKH.astype(cache_v_BSKH.dtype)
        T, S = q_BTNH.shape[1], cache_k_BSKH.shape[1]
        if T <= CACHED_SMALL_T:
            w = jnp.clip(jnp.asarray(write_index, jnp.int32), 0, S - T)
            slot_S = jnp.arange(S, dtype=jnp.int32)
            written_S = (slot_S >= w) & (slot_S < w + T)
            o_BTNH = cached_attention(q_BTNH, cache_k_BSKH, cache_v_BSKH, k_BTKH, v_BTKH,
                                      mask_BTS & ~written_S[None, None, :],
                                      jax.lax.dynamic_slice_in_dim(mask_BTS, w, T, axis=2), sm_scale=self.scale)
        else:
            k_all_BSKH = jax.lax.dynamic_update_slice_in_dim(cache_k_BSKH, k_BTKH, write_index, axis=1)
            v_all_BSKH = jax.lax.dynamic_update_slice_in_dim(cache_v_BSKH, v_BTKH, write_index, axis=1)
            o_BTNH = kernels.reference_attention(q_BTNH, k_all_BSKH, v_all_BSKH, sm_scale=self.scale,
                                                 mask_BTS=mask_BTS)
        return self.output(o_BTNH), k_BTKH, v_BTKH
