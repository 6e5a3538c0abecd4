"""Attention kernels for long context. Imports nothing of klong_jax.

`attention(q, k, v, impl=...)` dispatches to one implementation by name; all share one signature:
  fn(q_BTNH, k_BSKH, v_BSKH, *, doc_ids=None, window_ids=None, causal=True, sm_scale=None) -> o_BTNH
  reference  plain JAX with an explicit T x S mask (the oracle; small T only)
  blockwise  memory-linear XLA loops over the blocks the mask keeps (CPU / GPU at long context);
             under a mesh, run per batch/head shard
  pallas     Pallas TPU kernels (interpret mode off TPU); under a mesh, run per batch/head shard
  ring       context parallelism over the `context` mesh axis (Pallas per chunk on TPU, blockwise elsewhere)
Extra keyword arguments (block sizes, mesh, ...) pass through to the implementation.

Shape letters are the model's (written once in klong_jax/models/__init__.py): B batch, T query tokens,
S keys, N query heads, K kv heads (N = K * G), H head dim; I / J query / key blocks.
"""
import functools

# Modules, not their same-named functions, are bound here: `kernels.flash_attention` and
# `kernels.ring_attention` must stay importable as modules.
import kernels.flash_attention
import kernels.ring_attention
from kernels.blockwise import blockwise_attention
from kernels.mesh_specs import shard_batch_and_heads
from kernels.reference import attention_mask, reference_attention

IMPLEMENTATIONS = {
    "reference": reference_attention,
    # Both loop over blocks with data-dependent indices, which XLA cannot partition: under a mesh they
    # run per batch/head shard (shard_map), the sequence whole on each device.
    "blockwise": functools.partial(shard_batch_and_heads, blockwise_attention),
    "pallas": functools.partial(shard_batch_and_heads, kernels.flash_attention.flash_attention),
    "ring": kernels.ring_attention.ring_attention,
}


def attention(q_BTNH, k_BSKH, v_BSKH, *, impl: str = "reference", **kwargs):
    try:
        fn = IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"attention_impl={impl!r}; choose one of {sorted(IMPLEMENTATIONS)}") from None
    return fn(q_BTNH, k_BSKH, v_BSKH, **kwargs)


__all__ = ["attention", "attention_mask", "reference_attention", "blockwise_attention", "IMPLEMENTATIONS"]
