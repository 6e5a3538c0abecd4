"""kernels.cached_attention (new tokens against a KV cache as two parts of one softmax, the cache read in place)
against the brute force: reference_attention over the cache with the new k/v written at their slots."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernels
from kernels.cached import cached_attention
from klong_jax.models import attention as attention_module
from klong_jax.models import preset
from klong_jax.models.layers import rope_cos_sin

B, S, H, K, D = 4, 40, 6, 2, 16


def decode_mask(kv_valid_BS, write_index, T):
    """The mask Glm4MoeForCausalLM.decode_step builds: valid slots <= the query's slot."""
    return kernels.attention_mask(
        jnp.ones((B, T), jnp.int32), None, T, S, causal=True,
        q_positions_BT=(write_index + jnp.arange(T, dtype=jnp.int32))[None, :],
        k_positions_BS=jnp.arange(S, dtype=jnp.int32)[None, :], kv_doc_ids_BS=kv_valid_BS.astype(jnp.int32))


def inputs(seed, T, write_index):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, H, D))
    cache_k = jax.random.normal(ks[1], (B, S, K, D))
    cache_v = jax.random.normal(ks[2], (B, S, K, D))
    k_new = jax.random.normal(ks[3], (B, T, K, D))
    v_new = jax.random.normal(ks[4], (B, T, K, D))
    valid = np.ones((B, S), bool)
    valid[1, :5] = False                                  # left padding
    valid[2, 3:9] = False                                 # a hole (compacted-away slots)
    valid[3, :] = False                                   # an all-masked row (batch padding)
    if T > 1:
        valid[2, write_index + 1] = False                 # a padding column among the new tokens
        valid[1, :write_index + 1] = False                # row 1's first new column sees nothing
    return q, cache_k, cache_v, k_new, v_new, jnp.asarray(valid)


@pytest.mark.parametrize("T,write_index", [(1, 17), (1, S - 1), (3, 21), (5, 30)])
def test_equals_reference_over_the_updated_cache(T, write_index):
    q, cache_k, cache_v, k_new, v_new, valid = inputs(T, T, write_index)
    mask = decode_mask(valid, write_index, T)
    k_all = jax.lax.dynamic_update_slice_in_dim(cache_k, k_new, write_index, axis=1)
    v_all = jax.lax.dynamic_update_slice_in_dim(cache_v, v_new, write_index, axis=1)
    want = kernels.reference_attention(q, k_all, v_all, sm_scale=0.3, mask_BTS=mask)

    slot = jnp.arange(S)
    written = (slot >= write_index) & (slot < write_index + T)
    got = jax.jit(lambda *a: cached_attention(*a, sm_scale=0.3))(
        q, cache_k, cache_v, k_new, v_new, mask & ~written[None, None, :],
        jax.lax.dynamic_slice_in_dim(mask, write_index, T, axis=2))
    assert got.shape == want.shape and got.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)
    assert np.all(np.asarray(got[3]) == 0.0)              # the all-masked row: zeros, not NaN
    if T > 1:
        assert np.all(np.asarray(got[1, 0]) == 0.0)       # a query with nothing to attend to
    # The stale cache contents at the write slots are never read.
    poisoned = cache_k.at[:, write_index:write_index + T].set(1e4)
    again = cached_attention(q, poisoned, cache_v.at[:, write_index:write_index + T].set(-1e4), k_new, v_new,
                             mask & ~written[None, None, :],
                             jax.lax.dynamic_slice_in_dim(mask, write_index, T, axis=2), sm_scale=0.3)
    np.testing.assert_allclose(np.asarray(again), np.asarray(got), atol=1e-6, rtol=0)


def test_bf16_cache_matches_the_fp32_reference():
    T, w = 1, 12
    q, cache_k, cache_v, k_new, v_new, valid = inputs(7, T, w)
    cache_k, cache_v = cache_k.astype(jnp.bfloat16), cache_v.astype(jnp.bfloat16)
    k_new, v_new = k_new.astype(jnp.bfloat16), v_new.astype(jnp.bfloat16)
    mask = decode_mask(valid, w, T)
    want = kernels.reference_attention(q, jax.lax.dynamic_update_slice_in_dim(cache_k, k_new, w, axis=1),
                                       jax.lax.dynamic_update_slice_in_dim(cache_v, v_new, w, axis=1),
                                       mask_BTS=mask)
    written = (jnp.arange(S) == w)[None, None, :]
    got = cached_attention(q, cache_k, cache_v, k_new, v_new, mask & ~written,
                           jax.lax.dynamic_slice_in_dim(mask, w, T, axis=2))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("T,write_index", [(1, 9), (2, 30), (4, S - 2)])    # the last: clamped like the write
def test_attend_cached_paths_agree(monkeypatch, T, write_index):
    """Attention.attend_cached: the in-place path (T <= CACHED_SMALL_T) equals the copy path."""
    cfg = preset("tiny", compute_dtype="float32", num_attention_heads=H, num_key_value_heads=K, head_dim=D)
    attn = attention_module.Attention(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (B, T, cfg.hidden_size))
    _, cache_k, cache_v, _, _, valid = inputs(2, T, min(write_index, S - T))
    cos, sin = rope_cos_sin(write_index + jnp.broadcast_to(jnp.arange(T), (B, T)), cfg.rotary_dim, cfg.rope_theta)
    mask = decode_mask(valid, write_index, T)

    def run():
        return attn.attend_cached(x, cos, sin, cache_k, cache_v, jnp.int32(write_index), mask)

    assert T <= attention_module.CACHED_SMALL_T
    fast = run()
    monkeypatch.setattr(attention_module, "CACHED_SMALL_T", 0)
    slow = run()
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-5)
