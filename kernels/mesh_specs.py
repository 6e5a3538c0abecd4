"""How attention operands are laid over a mesh: batch over the data-like axes, heads over `tensor`.

Kernels import nothing of klong_jax, so this mirrors the model's activation rules generically: every
mesh axis other than the context and head axes may shard the batch (in mesh order, as long as the
product divides the batch), and the head axis shards kv heads when it divides them.
"""
import jax
from jax.sharding import PartitionSpec as P


def current_mesh(mesh=None):
    """The given mesh, else the one set by `jax.set_mesh`, else None."""
    if mesh is not None:
        return mesh
    abstract = jax.sharding.get_abstract_mesh()
    return None if abstract is None or abstract.empty else abstract


def axis_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def batch_axes(mesh, batch: int, exclude: tuple[str, ...]) -> tuple[str, ...]:
    chosen, product = [], 1
    for name, size in axis_sizes(mesh).items():
        if name in exclude or size == 1:
            continue
        if batch % (product * size) == 0:
            chosen.append(name)
            product *= size
    return tuple(chosen)


def attention_specs(mesh, q_BTNH, k_BSKH, *, seq_axis=None, head_axis="tensor"):
    """(q/k/v spec, per-token id spec) for shard_map; seq_axis shards the sequence (ring attention)."""
    sizes = axis_sizes(mesh)
    heads = head_axis if sizes.get(head_axis, 1) > 1 and k_BSKH.shape[2] % sizes[head_axis] == 0 else None
    batch = batch_axes(mesh, q_BTNH.shape[0], exclude=tuple(a for a in (seq_axis, head_axis) if a))
    batch_spec = batch if batch else None
    return P(batch_spec, seq_axis, heads, None), P(batch_spec, seq_axis)


def shard_batch_and_heads(fn, q_BTNH, k_BSKH, v_BSKH, *, doc_ids=None, window_ids=None, mesh=None,
                          head_axis="tensor", **kwargs):
    """Runs fn per shard of batch and heads when a mesh is set (Mosaic kernels cannot be partitioned
    automatically); the sequence stays whole on each device (use ring attention to split it)."""
    mesh = current_mesh(mesh)
    if mesh is None:
        return fn(q_BTNH, k_BSKH, v_BSKH, doc_ids=doc_ids, window_ids=window_ids, **kwargs)
    qkv_spec, ids_spec = attention_specs(mesh, q_BTNH, k_BSKH, head_axis=head_axis)

    def local(q, k, v, doc, win):
        return fn(q, k, v, doc_ids=doc, window_ids=win, **kwargs)

    id_specs = tuple(None if x is None else ids_spec for x in (doc_ids, window_ids))
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + id_specs, out_specs=qkv_spec,
                         check_vma=False)(q_BTNH, k_BSKH, v_BSKH, doc_ids, window_ids)
