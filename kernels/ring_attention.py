"""Ring attention: context parallelism over the `context` mesh axis, forward and backward.

The sequence is split over N devices of the context axis. Each device keeps its queries and passes its
keys/values around the ring with `ppermute`: after N steps every query has met every key, and the
partial results (o, lse) of each step are merged with the online-softmax rule. The backward runs the
ring again, with the dk/dv accumulators travelling alongside the keys they belong to and one last hop
bringing them home.

Load balance for causal masks: in natural order device i would hold the i-th chunk and the last
device would do N times the work of the first. The "zigzag" layout cuts the sequence into 2N chunks and
gives device i chunks i and 2N-1-i (`to_zigzag` / `from_zigzag`), so every device does the same work.
Pass layout="zigzag" when the data pipeline already feeds that order (no reshuffle of activations);
layout="natural" (the default) reorders inside the call. The causal rule always uses the true
packed-order positions, so doc_ids / window_ids keep their meaning in either layout.

Per pair of chunks the work is done by a core (kernels/vjp.py): the Pallas kernel when lowering for TPU,
the blockwise XLA loop elsewhere; both skip the blocks the mask rules out.
Shape letters (klong_jax/models/__init__.py): N query heads, K kv heads, H head dim.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels import blockwise
from kernels.flash_attention import core_bwd as pallas_core_bwd, core_fwd as pallas_core_fwd
from kernels.block_mask import Segments, make_segments
from kernels.mesh_specs import attention_specs, axis_sizes, current_mesh
from kernels.vjp import check_shapes


# ---------------------------------------------------------------------------------------------------
# Zigzag layout
# ---------------------------------------------------------------------------------------------------
def to_zigzag(x, num_devices: int, axis: int = 1):
    """Reorders `axis` (length divisible by 2N) so device i's contiguous shard is chunks (i, 2N-1-i)."""
    x = jnp.moveaxis(x, axis, 0)
    T, N = x.shape[0], num_devices
    if T % (2 * N):
        raise ValueError(f"kernels/ring_attention.py: length {T} is not divisible by 2 x {N} devices")
    halves = x.reshape(2, N, T // (2 * N), *x.shape[1:])
    paired = jnp.stack([halves[0], halves[1][::-1]], axis=1)        # [N, 2, chunk, ...]
    return jnp.moveaxis(paired.reshape(x.shape), 0, axis)


def from_zigzag(x, num_devices: int, axis: int = 1):
    """Inverse of to_zigzag."""
    x = jnp.moveaxis(x, axis, 0)
    T, N = x.shape[0], num_devices
    paired = x.reshape(N, 2, T // (2 * N), *x.shape[1:])
    natural = jnp.concatenate([paired[:, 0], paired[:, 1][::-1]], axis=0)
    return jnp.moveaxis(natural.reshape(x.shape), 0, axis)


def zigzag_permutation(length: int, num_devices: int):
    """perm with to_zigzag(x)[:, j] == x[:, perm[j]] (for inspection and tests)."""
    return to_zigzag(jnp.arange(length)[None], num_devices)[0]


# ---------------------------------------------------------------------------------------------------
# Per-device ring
# ---------------------------------------------------------------------------------------------------
def _cores(inner, block_q, block_k):
    """(core_fwd, core_bwd) for the chosen inner implementation; None picks by lowering platform."""
    blocks = dict(block_q=block_q, block_k=block_k)
    pallas = (functools.partial(pallas_core_fwd, interpret=False, **blocks),
              functools.partial(pallas_core_bwd, interpret=False, **blocks))
    xla = (functools.partial(blockwise.core_fwd, **blocks), functools.partial(blockwise.core_bwd, **blocks))
    if inner == "pallas":
        return pallas
    if inner == "pallas_interpret":
        return (functools.partial(pallas_core_fwd, interpret=True, **blocks),
                functools.partial(pallas_core_bwd, interpret=True, **blocks))
    if inner == "blockwise":
        return xla
    if inner is None:
        def pick(i):
            return lambda *a, **kw: lax.platform_dependent(*a, tpu=functools.partial(pallas[i], **kw),
                                                           default=functools.partial(xla[i], **kw))
        return pick(0), pick(1)
    raise ValueError(f"kernels/ring_attention.py: inner={inner!r}; choose pallas, blockwise or None")


def _merge(o_acc, lse_acc, o_new, lse_new):
    """Online-softmax merge of two partial results over disjoint key sets (lse -inf = no keys)."""
    lse = jnp.logaddexp(lse_acc, lse_new)
    live = jnp.isfinite(lse)
    safe = jnp.where(live, lse, 0.0)

    def weight(l):  # [B, N, T] -> [B, T, N, 1]
        return jnp.where(live, jnp.exp(l - safe), 0.0).transpose(0, 2, 1)[..., None]

    return o_acc * weight(lse_acc) + o_new * weight(lse_new), lse


def _ring_local(q, k, v, q_seg, k_seg, *, axis, n, causal, scale, cores):
    core_fwd, core_bwd = cores
    shift = [(i, (i + 1) % n) for i in range(n)]

    def pass_on(tree):
        if n == 1:
            return tree
        return jax.tree.map(lambda x: lax.ppermute(x, axis, shift), tree)

    def forward(q, k, v, q_seg, k_seg):
        B, T, N, H = q.shape
        o = jnp.zeros((B, T, N, H), jnp.float32)
        lse = jnp.full((B, N, T), -jnp.inf, jnp.float32)

        def compute(o, lse, kv):
            o_s, lse_s = core_fwd(q, kv[0], kv[1], q_seg, kv[2], causal=causal, scale=scale,
                                  out_dtype=jnp.float32)
            return _merge(o, lse, o_s, lse_s)

        def step(s, carry):
            o, lse, kv = carry
            nxt = pass_on(kv)  # issued before the compute so the transfer can overlap it
            return (*compute(o, lse, kv), nxt)

        o, lse, kv = lax.fori_loop(0, n - 1, step, (o, lse, (k, v, k_seg)))
        return compute(o, lse, kv)

    @jax.custom_vjp
    def attend(q, k, v, q_seg, k_seg):
        return forward(q, k, v, q_seg, k_seg)[0].astype(q.dtype)

    def fwd(q, k, v, q_seg, k_seg):
        o, lse = forward(q, k, v, q_seg, k_seg)
        o = o.astype(q.dtype)
        return o, (q, k, v, q_seg, k_seg, o, lse)

    def bwd(res, do):
        q, k, v, q_seg, k_seg, o, lse = res
        zeros_kv = jnp.zeros(k.shape, jnp.float32)

        def compute(dq, kv, dkv):
            dq_s, dk_s, dv_s = core_bwd(q, kv[0], kv[1], o, lse, do, q_seg, kv[2], causal=causal, scale=scale)
            return dq + dq_s, (dkv[0] + dk_s, dkv[1] + dv_s)

        def step(s, carry):
            dq, kv, dkv = carry
            nxt = pass_on(kv)
            dq, dkv = compute(dq, kv, dkv)
            return dq, nxt, pass_on(dkv)  # dk/dv travel with the keys they belong to

        dq, kv, dkv = lax.fori_loop(0, n - 1, step, (jnp.zeros(q.shape, jnp.float32), (k, v, k_seg),
                                                      (zeros_kv, zeros_kv)))
        dq, dkv = compute(dq, kv, dkv)
        dk, dv = pass_on(dkv)  # the last hop brings each device's dk/dv home
        no_grad = jax.tree.map(lambda _: None, (q_seg, k_seg))
        return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *no_grad)

    attend.defvjp(fwd, bwd)
    return attend(q, k, v, q_seg, k_seg)


# ---------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------
def ring_attention(q_BTNH, k_BSKH, v_BSKH, *, doc_ids=None, window_ids=None, causal=True, sm_scale=None,
                   mesh=None, context_axis: str = "context", head_axis: str = "tensor", layout: str = "natural",
                   inner=None, block_q: int = 512, block_k: int = 512):
    """Self-attention with the sequence sharded over `context_axis`; o_BTNH in q's dtype.

    mesh=None takes the mesh set by `jax.set_mesh`. Batch is sharded over the other data-like mesh
    axes and heads over `head_axis` when they divide. layout: "natural" (tokens in packed order) or
    "zigzag" (the caller already applied to_zigzag to q, k, v and the ids; the output is zigzag too).
    T is padded internally to a multiple of 2N.
    """
    check_shapes(q_BTNH, k_BSKH, v_BSKH, "kernels/ring_attention.py")
    if layout not in ("natural", "zigzag"):
        raise ValueError(f"kernels/ring_attention.py: layout={layout!r}; choose natural or zigzag")
    B, T, N, H = q_BTNH.shape
    if k_BSKH.shape[1] != T:
        raise ValueError("kernels/ring_attention.py: self-attention needs as many keys as queries")
    scale = H ** -0.5 if sm_scale is None else float(sm_scale)
    mesh = current_mesh(mesh)
    n = 1 if mesh is None else axis_sizes(mesh).get(context_axis, 1)
    cores = _cores(inner, block_q, block_k)
    seg = make_segments(B, T, doc_ids, window_ids)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if layout == "zigzag":
        if T % (2 * n):
            raise ValueError(f"kernels/ring_attention.py: zigzag input of length {T} must divide by 2 x {n}")
        pos = to_zigzag(pos, n)
    seg = seg._replace(pos=pos)
    reorder = layout == "natural" and causal and n > 1

    # Pad so the sequence splits into 2N equal chunks; padding has doc 0 and is never attended.
    Tp = -(-T // (2 * n)) * (2 * n) if reorder else -(-T // n) * n
    pad = Tp - T
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_BTNH, k_BSKH, v_BSKH))
    seg = Segments(*(None if x is None else jnp.pad(x, ((0, 0), (0, pad))) for x in seg))
    if reorder:
        q, k, v = (to_zigzag(x, n) for x in (q, k, v))
        seg = Segments(*(None if x is None else to_zigzag(x, n) for x in seg))

    if mesh is None:
        o = _ring_local(q, k, v, seg, seg, axis=None, n=1, causal=causal, scale=scale, cores=cores)
    else:
        qkv_spec, ids_spec = attention_specs(mesh, q, k, seq_axis=context_axis if n > 1 else None,
                                             head_axis=head_axis)
        seg_spec = Segments(*(None if x is None else ids_spec for x in seg))
        local = functools.partial(_ring_local, axis=context_axis, n=n, causal=causal, scale=scale, cores=cores)
        o = jax.shard_map(lambda q, k, v, s: local(q, k, v, s, s), mesh=mesh,
                          in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec), out_specs=qkv_spec,
                          check_vma=False)(q, k, v, seg)
    if reorder:
        o = from_zigzag(o, n)
    return o[:, :T]
