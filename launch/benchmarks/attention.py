"""Attention benchmark: memory per token, work skipped by the block mask, TPU compile figures.

  .venv/bin/python launch/bench.py attention [--seqs=4096,16384,65536] [--tpu_seqs=32768,131072]
                                             [--tpu_topology=v5p:2x2x1] [--no_tpu]

cpu_memory: forward+backward of the blockwise path and of the reference, compiled (not run) on CPU;
  temp bytes from memory_analysis(), per token. The blockwise figure must stay flat in T.
work_skipped: the share of (q-block, k-block) pairs the Pallas kernel visits, read from its schedule,
  for a causal row and for a shared-prefix row with 4 windows (and what unpacked windows would cost).
tpu: the Pallas kernel compiled for a TPU topology (subprocess, libtpu): cost_analysis flops / bytes
  (the kernels' own cost estimates, which assume causal halves the pairs) and memory_analysis bytes.
"""
import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from kernels import block_mask as bm
from kernels.blockwise import blockwise_attention
from kernels.flash_attention import _Plan
from kernels.reference import reference_attention
from kernels.testing import packed_batch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _shared_prefix_rows(T, windows=4):
    """One trajectory: a prefix of half the row, then `windows` equal windows."""
    prefix = T // 2
    return packed_batch(T, [[(prefix, [(T - prefix) // windows] * windows)]])


def _fwd_bwd_temp_bytes(fn, T, heads, kv_heads, head_dim, dtype):
    def loss(q, k, v, doc, win):
        return fn(q, k, v, doc_ids=doc, window_ids=win).astype(jnp.float32).sum()

    q = jax.ShapeDtypeStruct((1, T, heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((1, T, kv_heads, head_dim), dtype)
    ids = jax.ShapeDtypeStruct((1, T), jnp.int32)
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, ids, ids).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def cpu_memory(seqs, heads=4, kv_heads=1, head_dim=128, dtype=jnp.float32, block=512):
    rows = {}
    for impl, fn in (("blockwise", lambda *a, **kw: blockwise_attention(*a, block_q=block, block_k=block, **kw)),
                     ("reference", reference_attention)):
        rows[impl] = []
        for T in seqs:
            temp = _fwd_bwd_temp_bytes(fn, T, heads, kv_heads, head_dim, dtype)
            rows[impl].append(dict(seq=T, temp_bytes=temp, temp_bytes_per_token=round(temp / T, 1)))
    bw = rows["blockwise"]
    per_token = [r["temp_bytes_per_token"] for r in bw]
    # Bytes added per extra token between consecutive lengths: flat when memory is linear in T
    # (the per-token average also carries a fixed block-scratch term that fades with T).
    marginal = [round((b["temp_bytes"] - a["temp_bytes"]) / (b["seq"] - a["seq"]), 1) for a, b in zip(bw, bw[1:])]
    return dict(shape=dict(batch=1, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=jnp.dtype(dtype).name,
                           block=block, mask="shared prefix, 4 windows"),
                **rows, blockwise_per_token_ratio_last_to_first=round(per_token[-1] / per_token[0], 3),
                blockwise_marginal_bytes_per_token=marginal)


def work_skipped(T=16384, block=512):
    def visited(doc, win):
        plan = _Plan(jnp.zeros((1, T, 1, 128)), jnp.zeros((1, T, 1, 128)), bm.make_segments(1, T, doc, win),
                     bm.make_segments(1, T, doc, win), causal=True, block_q=block, block_k=block, interpret=False)
        kinds = plan.codes & 3
        return dict(blocks_total=int(kinds.size), blocks_computed=int((kinds != bm.SKIP).sum()),
                    blocks_full=int((kinds == bm.FULL).sum()), blocks_partial=int((kinds == bm.PARTIAL).sum()),
                    fraction_computed=round(float((kinds != bm.SKIP).mean()), 4))

    doc, win = _shared_prefix_rows(T)
    prefix, window = T // 2, T // 8
    # Unpacked, each window is its own row [prefix][window] of prefix + window tokens (causal blocks).
    n_pre, n_win = prefix // block, window // block
    unpacked_blocks = 4 * ((n_pre + n_win) * (n_pre + n_win + 1) // 2)
    shared = visited(doc, win)
    shared.update(unpacked_blocks_for_the_same_windows=unpacked_blocks,
                  packed_over_unpacked=round(shared["blocks_computed"] / unpacked_blocks, 4))
    return dict(seq=T, block=block, causal=visited(None, None), shared_prefix_4_windows=shared)


def tpu_figures(seqs, topology, heads=12, kv_heads=1, head_dim=128):
    cases = [dict(impl="pallas", seq=T, heads=heads, kv_heads=kv_heads, head_dim=head_dim, windows=True,
                  backward=backward) for T in seqs for backward in (False, True)]
    script = ("import json, sys\nfrom kernels.tpu_aot import compile_for_topology\n"
              "for c in json.loads(sys.argv[2]):\n"
              "    print(json.dumps(compile_for_topology(sys.argv[1], **c)), flush=True)\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", script, topology, json.dumps(cases)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return dict(error=proc.stderr[-3000:])
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def run(argv):
    ap = argparse.ArgumentParser(prog="bench.py attention")
    ap.add_argument("--seqs", default="4096,16384,65536")
    ap.add_argument("--tpu_seqs", default="32768,131072")
    ap.add_argument("--tpu_topology", default="v5p:2x2x1")
    ap.add_argument("--no_tpu", action="store_true")
    a = ap.parse_args(argv)
    result = dict(cpu_memory=cpu_memory([int(s) for s in a.seqs.split(",")]), work_skipped=work_skipped())
    if not a.no_tpu:
        result["tpu"] = dict(topology=a.tpu_topology, per_device="batch 1, 12 q heads over 1 kv head, bf16",
                             compiles=tpu_figures([int(s) for s in a.tpu_seqs.split(",")], a.tpu_topology))
    return result
