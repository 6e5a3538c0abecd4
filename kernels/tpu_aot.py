"""Compile attention for a TPU topology on any machine (libtpu installed, no TPU needed).

  python -m kernels.tpu_aot --topology=v5p:2x2x1 --impl=pallas --seq=1024 [--windows] [--backward]

prints one JSON object: whether Mosaic kernels were emitted, and the compiled program's cost_analysis
(flops, bytes accessed) and memory_analysis (argument / output / temp bytes per device). Mosaic kernels
only lower for TPU inside shard_map; `pallas` shards the batch over the whole slice, `ring` puts the
sequence on a `context` axis of the slice. Used by tests/test_kernels_tpu_compile.py and
launch/benchmarks/attention.py, each in a subprocess so libtpu never loads into the caller.
"""
import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import kernels


def _mesh(topo, shape, names):
    devices = topologies.make_mesh(topo, shape, names).devices
    return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))  # as the model's meshes


def compile_for_topology(topology: str, *, impl: str, seq: int, heads: int, kv_heads: int, head_dim: int,
                         windows: bool, backward: bool, dtype: str = "bfloat16", batch_per_device: int = 1,
                         block: int = 512) -> dict:
    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    n = len(topo.devices)
    if impl == "pallas":
        mesh = _mesh(topo, (n,), ("data",))
        batch, token_spec = n * batch_per_device, P("data")
        extra = dict(block_q=block, block_k=block, interpret=False)
    elif impl == "ring":
        mesh = _mesh(topo, (1, n), ("data", "context"))
        batch, token_spec = batch_per_device, P("data", "context")
        extra = dict(block_q=block, block_k=block, inner="pallas")
    else:
        raise ValueError(f"kernels/tpu_aot.py: impl={impl!r}; choose pallas or ring")

    def attend(q, k, v, doc, win):
        return kernels.attention(q, k, v, impl=impl, doc_ids=doc, window_ids=win if windows else None,
                                 causal=True, **extra)

    def loss(q, k, v, doc, win):
        return attend(q, k, v, doc, win).astype(jnp.float32).sum()

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2)) if backward else attend
    sharding = NamedSharding(mesh, P(*token_spec, None, None))
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=NamedSharding(mesh, token_spec))
    q = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), jnp.dtype(dtype), sharding=sharding)
    kv = jax.ShapeDtypeStruct((batch, seq, kv_heads, head_dim), jnp.dtype(dtype), sharding=sharding)
    with jax.set_mesh(mesh):
        lowered = jax.jit(fn).lower(q, kv, kv, ids, ids)
        mosaic_calls = lowered.as_text().count("tpu_custom_call")
        compiled = lowered.compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    return dict(topology=topology, devices=n, impl=impl, seq=seq, batch=batch, heads=heads, kv_heads=kv_heads,
                head_dim=head_dim, windows=windows, backward=backward, dtype=dtype, mosaic_calls=mosaic_calls,
                flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
                transcendentals=float(cost.get("transcendentals", 0.0)),
                argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
                temp_bytes=int(mem.temp_size_in_bytes))


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", required=True)
    ap.add_argument("--impl", default="pallas", choices=("pallas", "ring"))
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv_heads", type=int, default=2)
    ap.add_argument("--head_dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--batch_per_device", type=int, default=1)
    ap.add_argument("--windows", action="store_true")
    ap.add_argument("--backward", action="store_true")
    a = ap.parse_args(argv)
    result = compile_for_topology(a.topology, impl=a.impl, seq=a.seq, heads=a.heads, kv_heads=a.kv_heads,
                                  head_dim=a.head_dim, windows=a.windows, backward=a.backward, dtype=a.dtype,
                                  block=a.block, batch_per_device=a.batch_per_device)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main(sys.argv[1:]))
