"""GQA self-attention with q/k/v bias, optional per-head qk RMSNorm and partial NeoX RoPE.

Besides the training call, two inference paths for a KV cache: `attend_prefill` (the training call that
also hands back k/v for the cache) and `attend_cached` (new tokens against a cache under an explicit mask).
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
# cached_attention does K times the useful multiply-adds).
CACHED_SMALL_T = 8


class Attention(nnx.Module):
    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
        D, H, K, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        std = cfg.initializer_range
        self.q_proj = param(rngs, (D, H, hd), ("embed", "heads", "head_dim"), param_dtype, std=std)
        self.k_proj = param(rngs, (D, K, hd), ("embed", "kv_heads", "head_dim"), param_dtype, std=std)
        self.v_proj = param(rngs, (D, K, hd), ("embed", "kv_heads", "head_dim"), param_dtype, std=std)
        self.o_proj = param(rngs, (H, hd, D), ("heads", "head_dim", "embed"), param_dtype, std=std)
        if cfg.attention_bias:
            self.q_bias = param(rngs, (H, hd), ("heads", "head_dim"), param_dtype, init="zeros")
            self.k_bias = param(rngs, (K, hd), ("kv_heads", "head_dim"), param_dtype, init="zeros")
            self.v_bias = param(rngs, (K, hd), ("kv_heads", "head_dim"), param_dtype, init="zeros")
        if cfg.use_qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.use_bias, self.use_qk_norm = cfg.attention_bias, cfg.use_qk_norm
        self.impl, self.scale, self.dtype = cfg.attention_impl, hd ** -0.5, dtype

    def project_qkv(self, x_BTD, cos_BTR, sin_BTR):
        x = x_BTD.astype(self.dtype)
        q_BTHD = jnp.einsum("btd,dhk->bthk", x, self.q_proj[...].astype(self.dtype))
        k_BTKD = jnp.einsum("btd,dhk->bthk", x, self.k_proj[...].astype(self.dtype))
        v_BTKD = jnp.einsum("btd,dhk->bthk", x, self.v_proj[...].astype(self.dtype))
        if self.use_bias:
            q_BTHD = q_BTHD + self.q_bias[...].astype(self.dtype)
            k_BTKD = k_BTKD + self.k_bias[...].astype(self.dtype)
            v_BTKD = v_BTKD + self.v_bias[...].astype(self.dtype)
        if self.use_qk_norm:
            q_BTHD, k_BTKD = self.q_norm(q_BTHD), self.k_norm(k_BTKD)
        q_BTHD = apply_rope(q_BTHD, cos_BTR, sin_BTR)
        k_BTKD = apply_rope(k_BTKD, cos_BTR, sin_BTR)
        # Named so the save_attention_inputs remat policy can keep exactly these.
        q_BTHD = checkpoint_name(constrain(q_BTHD, ("batch", "seq", "act_heads", None)), "attn_q")
        k_BTKD = checkpoint_name(constrain(k_BTKD, ("batch", "seq", "act_kv_heads", None)), "attn_k")
        v_BTKD = checkpoint_name(constrain(v_BTKD, ("batch", "seq", "act_kv_heads", None)), "attn_v")
        return q_BTHD, k_BTKD, v_BTKD

    def output(self, o_BTHD):
        return jnp.einsum("bthk,hkd->btd", o_BTHD.astype(self.dtype), self.o_proj[...].astype(self.dtype))

    @jax.named_scope("attention")
    def __call__(self, x_BTD, cos_BTR, sin_BTR, *, doc_ids_BT=None, window_ids_BT=None):
        q_BTHD, k_BTKD, v_BTKD = self.project_qkv(x_BTD, cos_BTR, sin_BTR)
        o_BTHD = kernels.attention(q_BTHD, k_BTKD, v_BTKD, impl=self.impl, doc_ids=doc_ids_BT,
                                   window_ids=window_ids_BT, causal=True, sm_scale=self.scale)
        return self.output(o_BTHD)

    @jax.named_scope("attention")
    def attend_prefill(self, x_BTD, cos_BTR, sin_BTR, *, doc_ids_BT=None):
        """`__call__` (the configured kernel) that also returns this layer's k/v [B, T, K, hd] for a cache."""
        q_BTHD, k_BTKD, v_BTKD = self.project_qkv(x_BTD, cos_BTR, sin_BTR)
        o_BTHD = kernels.attention(q_BTHD, k_BTKD, v_BTKD, impl=self.impl, doc_ids=doc_ids_BT,
                                   causal=True, sm_scale=self.scale)
        return self.output(o_BTHD), k_BTKD, v_BTKD

    @jax.named_scope("attention")
    def attend_cached(self, x_BTD, cos_BTR, sin_BTR, cache_k_BSKD, cache_v_BSKD, write_index, mask_BTS):
        """T new tokens against a KV cache of S slots.

        Their k/v go to slots [write_index, write_index + T) (clamped into the cache as
        dynamic_update_slice clamps) and the queries attend over all S slots under mask_BTS (which must
        hide unwritten and padding slots), as if the new k/v were written there first. Returns
        (output [B, T, D], k_new [B, T, K, hd], v_new): the caller writes k_new/v_new into the stacked
        cache. For T <= CACHED_SMALL_T (decoding) nothing is written here: the cache, write slots
        masked out, and the new k/v are two parts of one softmax (kernels.cached_attention), reading the
        cache in place; longer chunks attend over a copy of the cache with the new k/v written in
        (kernels.reference_attention), whose cost the T queries amortise.
        """
        q_BTHD, k_BTKD, v_BTKD = self.project_qkv(x_BTD, cos_BTR, sin_BTR)
        k_BTKD, v_BTKD = k_BTKD.astype(cache_k_BSKD.dtype), v_BTKD.astype(cache_v_BSKD.dtype)
        T, S = q_BTHD.shape[1], cache_k_BSKD.shape[1]
        if T <= CACHED_SMALL_T:
            w = jnp.clip(jnp.asarray(write_index, jnp.int32), 0, S - T)
            slot_S = jnp.arange(S, dtype=jnp.int32)
            written_S = (slot_S >= w) & (slot_S < w + T)
            o_BTHD = cached_attention(q_BTHD, cache_k_BSKD, cache_v_BSKD, k_BTKD, v_BTKD,
                                      mask_BTS & ~written_S[None, None, :],
                                      jax.lax.dynamic_slice_in_dim(mask_BTS, w, T, axis=2), sm_scale=self.scale)
        else:
            k_all_BSKD = jax.lax.dynamic_update_slice_in_dim(cache_k_BSKD, k_BTKD, write_index, axis=1)
            v_all_BSKD = jax.lax.dynamic_update_slice_in_dim(cache_v_BSKD, v_BTKD, write_index, axis=1)
            o_BTHD = kernels.reference_attention(q_BTHD, k_all_BSKD, v_all_BSKD, sm_scale=self.scale,
                                                 mask_BTS=mask_BTS)
        return self.output(o_BTHD), k_BTKD, v_BTKD
