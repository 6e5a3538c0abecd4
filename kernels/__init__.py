"""Attention kernels for long context. Imports nothing of klong_jax.

`attention(q, k, v, impl=...)` dispatches to one implementation by name; all share one signature:
  fn(q_BTHD, k_BSKD, v_BSKD, *, doc_ids=None, window_ids=None, causal=True, sm_scale=None) -> o_BTHD
"""
from kernels.reference import attention_mask, reference_attention

IMPLEMENTATIONS = {
    "reference": reference_attention,
}


def attention(q_BTHD, k_BSKD, v_BSKD, *, impl: str = "reference", **kwargs):
    try:
        fn = IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"attention_impl={impl!r}; choose one of {sorted(IMPLEMENTATIONS)}") from None
    return fn(q_BTHD, k_BSKD, v_BSKD, **kwargs)


__all__ = ["attention", "attention_mask", "reference_attention", "IMPLEMENTATIONS"]
