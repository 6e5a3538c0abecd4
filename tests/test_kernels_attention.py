"""Blockwise XLA and Pallas (interpret mode on CPU) attention against the reference: values and grads."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

import kernels
from kernels.blockwise import blockwise_attention
from kernels.flash_attention import flash_attention
from kernels.reference import reference_attention
from kernels.testing import Case, packed_batch, random_qkv, value_and_grads

# Each case varies a few axes; together they cover causal / not, GQA ratios 1, 4, 12, head dims 64 and
# 128, blocks that do and do not divide T (and block_q != block_k), packing with padding, shared prefixes.
CASES = [
    Case("causal_mha_d64", B=2, T=256, N=2, K=2, H=64),
    Case("noncausal_mqa4_ragged", B=1, T=200, N=4, K=1, H=64, causal=False),
    Case("causal_gqa12_d128_ragged", B=1, T=300, N=12, K=1, H=128),
    Case("packed_docs_padding_q64_k128", B=2, T=320, N=4, K=2, H=64, block_q=64,
         rows=[[(100, []), (60, []), (90, [])], [(37, []), (200, [])]]),
    Case("shared_prefix_windows_gqa4_d128", B=2, T=384, N=8, K=2, H=128, windows=True,
         rows=[[(150, [50, 70, 40]), (60, [])], [(100, [30, 30, 30, 30]), (20, [40])]]),
    Case("shared_prefix_noncausal_ragged", B=1, T=250, N=4, K=4, H=64, causal=False, windows=True,
         block_q=64, block_k=64, rows=[[(90, [40, 60]), (30, [20])]]),
]

IMPLS = {
    "blockwise": lambda c: functools.partial(blockwise_attention, block_q=c.block_q, block_k=c.block_k),
    "pallas": lambda c: functools.partial(flash_attention, block_q=c.block_q, block_k=c.block_k),
}


def _assert_close(actual, expected, tol, what):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=tol, rtol=tol, err_msg=what)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_fp32_values_and_grads_match_reference(impl, case):
    q, k, v, kw = case.inputs()
    o, grads = value_and_grads(IMPLS[impl](case), q, k, v, **kw)
    o_ref, grads_ref = value_and_grads(reference_attention, q, k, v, **kw)
    _assert_close(o, o_ref, 1e-5, "output")
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        _assert_close(g, g_ref, 1e-4, f"d{name}")


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_bf16_matches_fp32_reference_within_bf16_error(impl):
    # bf16 inputs, fp32 softmax statistics, bf16 P before the P @ V matmul (as on TPU). Bound: the
    # error of rounding O(1) values to bf16 (2^-8 relative) compounded over a few matmuls: 2e-2 on
    # outputs and 2e-2 of the largest gradient entry on gradients.
    case = CASES[4]
    q, k, v, kw = case.inputs(jnp.bfloat16)
    o, grads = value_and_grads(IMPLS[impl](case), q, k, v, **kw)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    o_ref, grads_ref = value_and_grads(reference_attention, *f32, **kw)
    assert IMPLS[impl](case)(q, k, v, **kw).dtype == jnp.bfloat16
    _assert_close(o, o_ref, 2e-2, "output")
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        bound = 2e-2 * float(jnp.abs(g_ref).max())
        assert float(jnp.abs(g - g_ref).max()) <= bound, f"d{name} error above {bound}"


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_skipped_blocks_are_never_read(impl):
    # Document 2 fills blocks 2-3 exactly; poisoning its values with NaN must leave document 1
    # finite. A kernel that computed those blocks and masked afterwards would spread NaN (0 * NaN).
    T, bq = 256, 64
    q, k, v = random_qkv(1, 1, T, 2, 1, 64)
    doc, _ = packed_batch(T, [[(128, []), (128, [])]])
    v = v.at[:, 128:].set(jnp.nan)
    fn = functools.partial({"blockwise": blockwise_attention, "pallas": flash_attention}[impl],
                           block_q=bq, block_k=bq)
    o = jax.jit(lambda q, k, v: fn(q, k, v, doc_ids=doc))(q, k, v)
    assert np.isfinite(np.asarray(o[:, :128])).all()
    np.testing.assert_allclose(np.asarray(o[:, :128]),
                               np.asarray(reference_attention(q[:, :128], k[:, :128], v[:, :128])),
                               atol=1e-5, rtol=1e-5)


def test_dispatcher_gives_the_same_result_for_every_implementation():
    case = CASES[4]
    q, k, v, kw = case.inputs()
    o_ref = kernels.attention(q, k, v, impl="reference", **kw)
    for impl in ("blockwise", "pallas", "ring"):
        o = jax.jit(functools.partial(kernels.attention, impl=impl, block_q=128, block_k=128, **kw))(q, k, v)
        _assert_close(o, o_ref, 1e-5, impl)
    with pytest.raises(ValueError, match="choose one of"):
        kernels.attention(q, k, v, impl="nope")


@pytest.mark.parametrize("impl,case", [("pallas", CASES[4]), ("blockwise", CASES[0])], ids=["pallas", "blockwise"])
def test_dispatcher_under_a_mesh_runs_per_batch_and_head_shard(impl, case):
    # What the model does: call the dispatcher inside jit under jax.set_mesh. Mosaic kernels and the
    # blockwise loops cannot be partitioned by XLA, so these entries shard batch over data-like axes
    # and heads over "tensor" with shard_map.
    q, k, v, kw = case.inputs()
    o_ref, grads_ref = value_and_grads(reference_attention, q, k, v, **kw)
    mesh = jax.make_mesh((2, 2, 2), ("data", "context", "tensor"), axis_types=(AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        o, grads = value_and_grads(functools.partial(kernels.attention, impl=impl), q, k, v, **kw)
    _assert_close(o, o_ref, 1e-5, "output")
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        _assert_close(g, g_ref, 1e-4, f"d{name}")


def test_bad_shapes_are_reported():
    q, k, v = random_qkv(0, 1, 64, 3, 2, 64)
    with pytest.raises(ValueError, match="not a multiple of 2 kv heads"):
        flash_attention(q, k, v)
    with pytest.raises(ValueError, match="blockwise.py"):
        blockwise_attention(q[..., :32], k, v)


def test_pallas_splits_the_batch_when_schedules_outgrow_smem(monkeypatch):
    # On TPU the per-row block schedule lives in SMEM; rows that do not fit together run as separate
    # kernel calls. Force one row per call and check the result is unchanged.
    import kernels.flash_attention as fa

    monkeypatch.setattr(fa, "SMEM_SCHEDULE_BYTES", 1)
    case = CASES[3]
    q, k, v, kw = case.inputs()
    o, grads = value_and_grads(IMPLS["pallas"](case), q, k, v, **kw)
    o_ref, grads_ref = value_and_grads(reference_attention, q, k, v, **kw)
    _assert_close(o, o_ref, 1e-5, "output")
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        _assert_close(g, g_ref, 1e-4, f"d{name}")
