"""Sampler benchmark: greedy decode tokens/s with the KV cache against re-running the full forward pass.

  .venv/bin/python launch/bench.py sampler [--presets=tiny,small,smol] [--batches=1,16] [--prompt_len=32]
                                           [--gen_tokens=tiny:64,small:32] [--compute_dtype=float32] [--repeats=3]

kv_cache: the Sampler's compiled prefill, then its decode loop to the end; decode tokens/s counts the
  B * (gen - 1) tokens the loop generates (token 0 comes from the prefill), timed without the prefill.
  generate_tokens_per_s is Sampler.generate end to end (prefill, host loop, transfers) for B * gen tokens.
no_cache: the same model decoding greedily without a cache: each step re-runs the whole model over a
  fixed [B, prompt_len + gen] buffer (static shapes, one compilation) and takes the token at the current
  position; its tokens must equal the cached decoder's (tokens_match).
Both are compiled before timing; figures are the best of --repeats runs (--baseline_repeats for the
uncached decoder). Ratios are cached / uncached.
"""
import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klong_jax.models import init_model, preset
from klong_jax.sampling import Sampler, SamplingParams


def _best_time(fn, repeats):
    best = float("inf")
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best, out


def _no_cache_decoder(graphdef, prompt_len, gen):
    @jax.jit
    def run(state, buf_BT):
        model = nnx.merge(graphdef, state)

        def step(i, buf):
            pos = prompt_len - 1 + i
            h_BTD, _ = model.hidden_states(buf)
            h_BD = jax.lax.dynamic_slice_in_dim(h_BTD, pos, 1, axis=1)
            token_B = jnp.argmax(model.logits(h_BD)[:, 0], axis=-1).astype(buf.dtype)
            return jax.lax.dynamic_update_slice_in_dim(buf, token_B[:, None], pos + 1, axis=1)

        return jax.lax.fori_loop(0, gen, step, buf_BT)

    return run


def _model_cfg(name, compute_dtype):
    """A model preset (klong_jax/models/config.py), or an SFT config variant whose model is no preset (smol: the
    upcycled SmolLM2; random weights: the speed does not depend on them)."""
    from klong_jax.models import PRESETS
    if name in PRESETS:
        return preset(name, compute_dtype=compute_dtype, param_dtype="float32")
    from configs.sft import get_config
    from klong_jax.models.from_config import model_config_from
    return model_config_from(get_config(name).model).replace(compute_dtype=compute_dtype, param_dtype="float32")


def bench_one(name, batch, prompt_len, gen, compute_dtype, repeats, baseline_repeats):
    cfg = _model_cfg(name, compute_dtype)
    model = init_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, cfg.vocab_size, prompt_len).tolist() for _ in range(batch)]
    params = SamplingParams(max_new_tokens=gen, temperature=0.0, use_default_stop_tokens=False)
    sampler = Sampler(model, min_prompt_bucket=prompt_len, min_new_bucket=gen, decode_chunk=gen)
    P, N = prompt_len, gen
    host = sampler._host_batch(prompts, [params] * batch, [()] * batch, batch, P)
    batch_arrays = sampler._put(host)

    def prefill():
        return sampler.prefill_fn(sampler.state, batch_arrays, P + N, N, False, False)[0]

    jax.block_until_ready(sampler.decode_fn(sampler.state, prefill(), np.int32(N)))   # compile both
    prefill_s, _ = _best_time(prefill, repeats)
    decode_s = float("inf")
    for _ in range(repeats):
        st = jax.block_until_ready(prefill())    # decode donates its input: a fresh state each run
        t0 = time.perf_counter()
        st = jax.block_until_ready(sampler.decode_fn(sampler.state, st, np.int32(N)))
        decode_s = min(decode_s, time.perf_counter() - t0)
    cached_tokens = np.asarray(st["tokens_BN"])
    sampler.generate(prompts, params)            # warm the host path
    gen_s, outs = _best_time(lambda: sampler.generate(prompts, params), repeats)

    graphdef, state = nnx.split(model)
    run = _no_cache_decoder(graphdef, P, N)
    buf = np.zeros((batch, P + N), np.int32)
    buf[:, :P] = np.asarray(prompts)
    buf = jnp.asarray(buf)
    compiled = run.lower(state, buf).compile()   # compiled, not run: one uncached run can take minutes
    nocache_s, out_buf = _best_time(lambda: compiled(state, buf), baseline_repeats)
    nocache_tokens = np.asarray(out_buf)[:, P:]
    decode_tok_s = batch * (N - 1) / decode_s
    nocache_tok_s = batch * N / nocache_s
    return {
        "preset": name, "batch": batch, "prompt_len": P, "gen_tokens": N, "compute_dtype": compute_dtype,
        "kv_cache": {"prefill_s": round(prefill_s, 4), "decode_s": round(decode_s, 4),
                     "decode_tokens_per_s": round(decode_tok_s, 1),
                     "generate_s": round(gen_s, 4), "generate_tokens_per_s": round(batch * N / gen_s, 1)},
        "no_cache": {"decode_s": round(nocache_s, 4), "decode_tokens_per_s": round(nocache_tok_s, 1)},
        "speedup_decode": round(decode_tok_s / nocache_tok_s, 2),
        "speedup_generate": round(batch * N / gen_s / nocache_tok_s, 2),
        "tokens_match": bool((cached_tokens == nocache_tokens).all()
                             and all(o.tokens == c.tolist() for o, c in zip(outs, cached_tokens))),
    }


def run(argv):
    p = argparse.ArgumentParser(prog="bench.py sampler")
    p.add_argument("--presets", default="tiny,small", help="model presets or SFT config variants (smol)")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--gen_tokens", default="tiny:64,small:32", help="preset:tokens,...")
    p.add_argument("--compute_dtype", default="float32", help="compute dtype (bfloat16 is slow on CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline_repeats", type=int, default=1, help="runs of the (slow) uncached decoder")
    a = p.parse_args(argv)
    gen = {k: int(v) for k, v in (item.split(":") for item in a.gen_tokens.split(","))}
    rows = []
    for name in a.presets.split(","):
        for b in (int(x) for x in a.batches.split(",")):
            rows.append(bench_one(name, b, a.prompt_len, gen.get(name, 32), a.compute_dtype, a.repeats,
                                  a.baseline_repeats))
            print(f"{name} batch {b}: {rows[-1]}", file=sys.stderr, flush=True)
    return {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "backend": jax.default_backend(),
            "results": rows}
