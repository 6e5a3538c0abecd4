"""Ring attention on the 8-device CPU mesh equals the reference (values and grads); zigzag layout."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from kernels.reference import reference_attention
from kernels.ring_attention import from_zigzag, ring_attention, to_zigzag, zigzag_permutation
from kernels.testing import Case, value_and_grads

CASES = [
    Case("causal_gqa2", B=2, T=256, N=4, K=2, H=64, block_q=32, block_k=32),
    Case("shared_prefix_windows_ragged", B=2, T=250, N=4, K=1, H=64, windows=True, block_q=16, block_k=16,
         rows=[[(90, [40, 30, 40]), (30, [])], [(60, [20, 20]), (100, [])]]),
    Case("packed_noncausal", B=2, T=128, N=2, K=2, H=128, causal=False, block_q=16, block_k=16,
         rows=[[(50, []), (40, [])], [(128, [])]]),
]
MESHES = {"context8": (1, 8), "data2_context4": (2, 4)}


def _mesh(shape):
    return jax.make_mesh(shape, ("data", "context"), axis_types=(AxisType.Auto,) * 2)


def test_zigzag_layout_round_trips_and_balances_chunks():
    perm = np.asarray(zigzag_permutation(16, 4))
    np.testing.assert_array_equal(perm, [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9])
    x = jnp.arange(3 * 24 * 2).reshape(3, 24, 2)
    np.testing.assert_array_equal(np.asarray(from_zigzag(to_zigzag(x, 3), 3)), np.asarray(x))
    # Causal work per device (keys at or before each query) is equal in the zigzag layout.
    work = (perm.reshape(4, 4) + 1).sum(1)
    assert len(set(work.tolist())) == 1
    with pytest.raises(ValueError, match="not divisible by 2 x 4"):
        to_zigzag(jnp.zeros((1, 12)), 4)


@pytest.mark.parametrize("case,mesh_name", [(CASES[0], "context8"), (CASES[1], "context8"),
                                             (CASES[1], "data2_context4"), (CASES[2], "data2_context4")],
                         ids=lambda x: repr(x) if isinstance(x, Case) else x)
def test_ring_matches_reference(case, mesh_name):
    q, k, v, kw = case.inputs()
    o_ref, grads_ref = value_and_grads(reference_attention, q, k, v, **kw)
    mesh = _mesh(MESHES[mesh_name])
    fn = functools.partial(ring_attention, block_q=case.block_q, block_k=case.block_k)
    with jax.set_mesh(mesh):
        o, grads = value_and_grads(fn, q, k, v, **kw)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=1e-5, rtol=1e-5)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-4, rtol=1e-4, err_msg=f"d{name}")


def test_ring_with_explicit_mesh_and_zigzag_input_keeps_the_sequence_sharded():
    # The data pipeline may feed the zigzag order directly: no reordering inside, output stays zigzag.
    case = CASES[1]
    q, k, v, kw = case.inputs()
    q, k, v = (x[:, :248] for x in (q, k, v))
    kw = {name: x[:, :248] if name != "causal" else x for name, x in kw.items()}
    o_ref = reference_attention(q, k, v, **kw)
    mesh = _mesh((2, 4))
    zz = functools.partial(to_zigzag, num_devices=4)
    args = [zz(x) for x in (q, k, v)]
    ids = {name: zz(x) for name, x in kw.items() if name != "causal"}
    sharding = NamedSharding(mesh, P("data", "context"))
    ids = {name: jax.device_put(x, sharding) for name, x in ids.items()}
    fn = jax.jit(lambda q, k, v, ids: ring_attention(q, k, v, mesh=mesh, layout="zigzag", block_q=16,
                                                     block_k=16, **ids))
    o = fn(*args, ids)
    np.testing.assert_allclose(np.asarray(from_zigzag(o, 4)), np.asarray(o_ref), atol=1e-5, rtol=1e-5)
    hlo = fn.lower(*args, ids).compile().as_text()
    assert "collective-permute" in hlo


def test_ring_with_pallas_inner_in_interpret_mode():
    case = CASES[0]
    q, k, v, kw = case.inputs()
    o_ref, grads_ref = value_and_grads(reference_attention, q, k, v, **kw)
    fn = functools.partial(ring_attention, inner="pallas_interpret", block_q=128, block_k=128)
    with jax.set_mesh(_mesh((2, 4))):
        o, grads = value_and_grads(fn, q, k, v, **kw)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-4, rtol=1e-4)
