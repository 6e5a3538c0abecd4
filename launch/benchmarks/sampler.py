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

  .venv/bin/python launch/bench.py sampler --mode=rollout [--presets=smol] [--tasks=2] [--max_turns=3]
                                           [--max_new_tokens_per_turn=32] [--session_chunk=128] [--init_from=...]

rollout: KV-cache reuse across turns on a real agent rollout (`run_episodes`: sandboxed tools, the
ContextPolicy), greedy, on the first --tasks held-out tasks of the config's embedded suite (prepared by
prepare_embedded, loaded by klong_jax.rl.loop.load_tasks), one episode each, all concurrent, routing of sampled
and prompt tokens recorded as in RL. The same rollout runs twice in one process, with a SamplerPolicy that
re-prefills every turn's whole context (reuse_cache=False) and one that keeps each episode's cache
(reuse_cache=True); each policy first runs a one-turn rollout of one task, so compilation is not timed.
Reported per policy: wall seconds of the rollout and of its sampling, prompt tokens prefilled per episode
(real tokens, and computed columns with padding), tokens reused; the ratios no-reuse / reuse; and whether the
two rollouts produced the same tokens (tokens_match; the routing and log-prob agreement are reported too).
--presets names an SFT config variant (smol: SmolLM2-135M-Instruct upcycled, its pretrained weights unless
--init_from=random).

  .venv/bin/python launch/bench.py sampler --mode=rollout_config [--presets=smol] [--rollouts="trainer;config"]
                                           [--tasks=8] [--max_turns=4] [--max_new_tokens_per_turn=96] [--cpu_devices=2]

rollout_config: where the rollout sampler holds the policy (config.rollout: devices, dtype, session chunk). The model
sits on the variant's training mesh over --cpu_devices emulated devices (as in the RL loop and the pipeline); the
same greedy, graded rollout (cache reuse on) runs once per --rollouts entry, the first the baseline: `trainer` (the
sampler before config.rollout: the model's dtype, every device, 128-token chunks), `config` (the variant's section)
or explicit fields. Reported per entry: wall and sampling seconds, turns, tokens, mean score, the share of turns
whose tokens equal the baseline's, and the speedups over the baseline.

  .venv/bin/python launch/bench.py sampler --mode=constrained [--gguf=pretrained:smollm2-135m-instruct]
                                           [--gen_tokens=smol:192] [--dtypes=bfloat16,float32] [--repeats=2]

constrained: JSON-schema constrained decoding (klong_jax.sampling.constraint) against free decoding, greedy, on a
GGUF model served as launch/serve.py serves it (the rubric drafter's criteria schema and a drafting prompt, in the
model's chat template). Per compute dtype: free decoding (decode_chunk 32), constrained decoding (one token per
device call, the host computing each next mask), the host's mask time per token, tokens/s and the ratio
constrained / free, and whether the constrained answer is whole JSON that the schema's grammar accepts.
"""
import argparse
import os
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

    decode_tok_s = batch * (N - 1) / decode_s
    row = {
        "preset": name, "batch": batch, "prompt_len": P, "gen_tokens": N, "compute_dtype": compute_dtype,
        "kv_cache": {"prefill_s": round(prefill_s, 4), "decode_s": round(decode_s, 4),
                     "decode_tokens_per_s": round(decode_tok_s, 1),
                     "generate_s": round(gen_s, 4), "generate_tokens_per_s": round(batch * N / gen_s, 1)},
    }
    if baseline_repeats == 0:   # --baseline_repeats=0: no uncached reference (minutes at long prompts)
        return row
    graphdef, state = nnx.split(model)
    run = _no_cache_decoder(graphdef, P, N)
    buf = np.zeros((batch, P + N), np.int32)
    buf[:, :P] = np.asarray(prompts)
    buf = jnp.asarray(buf)
    compiled = run.lower(state, buf).compile()   # compiled, not run: one uncached run can take minutes
    nocache_s, out_buf = _best_time(lambda: compiled(state, buf), baseline_repeats)
    nocache_tokens = np.asarray(out_buf)[:, P:]
    nocache_tok_s = batch * N / nocache_s
    return {
        **row,
        "no_cache": {"decode_s": round(nocache_s, 4), "decode_tokens_per_s": round(nocache_tok_s, 1)},
        "speedup_decode": round(decode_tok_s / nocache_tok_s, 2),
        "speedup_generate": round(batch * N / gen_s / nocache_tok_s, 2),
        "tokens_match": bool((cached_tokens == nocache_tokens).all()
                             and all(o.tokens == c.tolist() for o, c in zip(outs, cached_tokens))),
    }



def _rollout_setup(name, init_from, max_turns, max_new_tokens_per_turn, n_tasks):
    """(model, template, agent config, tasks) of SFT config variant `name`, as launch/eval.py builds them."""
    from configs.sft import get_config
    from klong_jax.agent import AgentConfig
    from klong_jax.data.chat_template import make_chat_template
    from klong_jax.data.tokenizer import load_tokenizer
    from klong_jax.models.from_config import model_config_from, upcycle_config_from
    from klong_jax.rl.loop import load_tasks
    from klong_jax.training.embedded_data import prepare_embedded, tokenizer_of
    from klong_jax.training.state import initial_model
    cfg = get_config(name)
    paths = prepare_embedded(cfg.data.embedded)
    template = make_chat_template(load_tokenizer(tokenizer_of(cfg.data)), cfg.data.get("chat_template", "auto"))
    agent = dict(cfg.agent.to_dict(), max_turns=max_turns, max_new_tokens_per_turn=max_new_tokens_per_turn,
                 temperature=0.0)
    config = AgentConfig.from_mapping(agent, context=cfg.data.pipeline.context.to_dict())
    source = "" if init_from == "random" else (init_from or cfg.init_from)
    model = initial_model(model_config_from(cfg.model), None, init_from=source, seed=cfg.seed,
                          upcycle=upcycle_config_from(cfg.model))
    return model, template, config, load_tasks(paths["heldout_tasks"], n_tasks), source or "random"


def bench_rollout(name, a):
    """One rollout without and one with KV-cache reuse across turns (see the module docstring)."""
    import dataclasses
    import tempfile

    from klong_jax.agent import run_episodes
    from klong_jax.agent.sampler_policy import SamplerPolicy
    from klong_jax.sandbox import SandboxPool
    model, template, config, tasks, source = _rollout_setup(name, a.init_from, a.max_turns,
                                                             a.max_new_tokens_per_turn, a.tasks)
    workdir = tempfile.mkdtemp(prefix="bench_rollout_")
    pool = SandboxPool(max_concurrent=len(tasks))
    buckets = SamplerPolicy.rollout_buckets(config, len(tasks), template)
    rows, results = {}, {}
    for reuse in (False, True):
        tag = "reuse" if reuse else "no_reuse"
        policy = SamplerPolicy.from_model(model, seed=0, reuse_cache=reuse, session_chunk=a.session_chunk, **buckets)
        t0 = time.perf_counter()   # warm-up: one turn of one task compiles every function the rollout uses
        run_episodes(tasks[:1], policy, n_per_task=1, template=template, config=dataclasses.replace(config, max_turns=1),
                     pool=pool, workdir=os.path.join(workdir, f"warm_{tag}"), grade=False, return_routing=True,
                     return_prompt_routing=True)
        warm_s = time.perf_counter() - t0
        stats0, timings = dict(policy.stats), {}
        t0 = time.perf_counter()
        res = run_episodes(tasks, policy, n_per_task=1, template=template, config=config, pool=pool,
                           workdir=os.path.join(workdir, tag), grade=False, return_routing=True,
                           return_prompt_routing=True, timings=timings)
        wall = time.perf_counter() - t0
        stats = {k: v - stats0.get(k, 0) for k, v in policy.stats.items()}
        n_ep = len(res)
        rows[tag] = {
            "wall_s": round(wall, 2), "sampling_s": round(timings["sampling_s"], 2),
            "tools_s": round(timings["tools_s"], 2), "warmup_s": round(warm_s, 2),
            "turns": sum(len(r.turns) for r in res), "sampled_tokens": sum(r.sampled_tokens for r in res),
            "prompt_tokens_per_episode": round(stats.get("prompt_tokens", 0) / n_ep, 1),
            "prefill_tokens_per_episode": round(timings["prefill_tokens"] / n_ep, 1),
            "prefill_columns_per_episode": round(stats.get("prefill_columns", 0) / n_ep, 1),
            "reused_tokens_per_episode": round(timings["reused_tokens"] / n_ep, 1),
            **{k: stats.get(k, 0) for k in ("compactions", "evicted_caches", "chunk_calls")},
        }
        results[tag] = res
        print(f"{name} rollout {tag}: {rows[tag]}", file=sys.stderr, flush=True)
    a_res, b_res = results["no_reuse"], results["reuse"]
    pairs = [(x, y) for ra, rb in zip(a_res, b_res) for x, y in zip(ra.turns, rb.turns)]
    same_turns = all(len(ra.turns) == len(rb.turns) for ra, rb in zip(a_res, b_res))
    tokens_match = same_turns and all(x.sampled_ids.tolist() == y.sampled_ids.tolist() for x, y in pairs)
    lp_diff = max((float(np.abs(x.logprobs - y.logprobs).max()) for x, y in pairs
                   if x.logprobs.shape == y.logprobs.shape and len(x.logprobs)), default=0.0)

    def routing_agreement(field):
        same = total = 0
        for x, y in pairs:
            u, v = getattr(x, field), getattr(y, field)
            if u is not None and v is not None and u.shape == v.shape:
                same += int((u == v).all(axis=-1).sum())
                total += u.shape[0] * u.shape[1]
        return round(same / max(total, 1), 6)

    nr, r = rows["no_reuse"], rows["reuse"]
    return {"preset": name, "init_from": source, "tasks": len(tasks), "max_turns": config.max_turns,
            "max_new_tokens_per_turn": config.max_new_tokens_per_turn, "budget_tokens": config.context.budget_tokens,
            "session_chunk": a.session_chunk, "compute_dtype": model.cfg.compute_dtype,
            "no_reuse": nr, "reuse": r,
            "prefill_tokens_ratio": round(nr["prefill_tokens_per_episode"] / max(r["prefill_tokens_per_episode"], 1), 2),
            "prefill_columns_ratio": round(nr["prefill_columns_per_episode"] /
                                           max(r["prefill_columns_per_episode"], 1), 2),
            "sampling_speedup": round(nr["sampling_s"] / max(r["sampling_s"], 1e-9), 2),
            "wall_speedup": round(nr["wall_s"] / max(r["wall_s"], 1e-9), 2),
            "tokens_match": bool(tokens_match), "max_logprob_diff": round(lp_diff, 6),
            "routing_agreement": routing_agreement("routed_experts"),
            "prompt_routing_agreement": routing_agreement("prompt_routed_experts")}


def _rollout_spec(spec: str, name: str):
    """A RolloutConfig from --rollouts: `trainer` (the defaults: the model's dtype on every device, 128-token
    chunks: the sampler before config.rollout), `config` (the variant's config.rollout) or `k=v,...` fields."""
    from configs.sft import get_config
    from klong_jax.agent import RolloutConfig
    if spec == "trainer":
        return RolloutConfig()
    if spec == "config":
        return RolloutConfig.from_mapping(get_config(name).rollout)
    try:
        items = dict(item.split("=", 1) for item in spec.split(",") if item)
    except ValueError:
        raise SystemExit(f"--rollouts: {spec!r} is not trainer, config or k=v[,k=v...]") from None
    return RolloutConfig.from_mapping({k: (v if k == "dtype" else int(v)) for k, v in items.items()})


def bench_rollout_configs(name, a):
    """The same greedy rollout (graded) under each --rollouts sampler placement, the first the baseline; the model
    sits on the variant's training mesh, as in the RL loop and the pipeline's evaluations."""
    import dataclasses
    import tempfile

    from configs.sft import get_config
    from klong_jax.agent import run_episodes
    from klong_jax.agent.sampler_policy import SamplerPolicy
    from klong_jax.sandbox import SandboxPool
    from klong_jax.sharding import make_mesh, state_shardings
    model, template, config, tasks, source = _rollout_setup(name, a.init_from, a.max_turns,
                                                             a.max_new_tokens_per_turn, a.tasks)
    mesh = make_mesh(dict(get_config(name).mesh.shape))
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
    workdir = tempfile.mkdtemp(prefix="bench_rollout_configs_")
    pool = SandboxPool(max_concurrent=len(tasks))
    buckets = SamplerPolicy.rollout_buckets(config, len(tasks), template)
    rows, results = [], []
    for i, spec in enumerate(a.rollouts.split(";")):
        rollout = _rollout_spec(spec, name)
        policy = SamplerPolicy.from_model(model, mesh, seed=0, rollout=rollout, **buckets)
        t0 = time.perf_counter()   # warm-up: one turn of one task compiles every function the rollout uses
        run_episodes(tasks[:1], policy, n_per_task=1, template=template, config=dataclasses.replace(config, max_turns=1),
                     pool=pool, workdir=os.path.join(workdir, f"warm_{i}"), grade=False)
        warm_s = time.perf_counter() - t0
        timings = {}
        t0 = time.perf_counter()
        res = run_episodes(tasks, policy, n_per_task=1, template=template, config=config, pool=pool,
                           workdir=os.path.join(workdir, str(i)), timings=timings)
        wall = time.perf_counter() - t0
        rows.append({"rollout": spec, **dataclasses.asdict(rollout), "wall_s": round(wall, 2),
                     "sampling_s": round(timings["sampling_s"], 2), "tools_s": round(timings["tools_s"], 2),
                     "warmup_s": round(warm_s, 2), "turns": sum(len(r.turns) for r in res),
                     "sampled_tokens": sum(r.sampled_tokens for r in res),
                     "mean_score": round(float(np.mean([r.reward for r in res])), 4)})
        results.append(res)
        del policy
        print(f"{name} rollout {spec}: {rows[-1]}", file=sys.stderr, flush=True)
    for row, res in zip(rows, results):
        pairs = [(x, y) for ra, rb in zip(results[0], res) for x, y in zip(ra.turns, rb.turns)]
        row["turns_same_tokens_as_baseline"] = round(
            sum(x.sampled_ids.tolist() == y.sampled_ids.tolist() for x, y in pairs) / max(len(pairs), 1), 4)
        row["wall_speedup"] = round(rows[0]["wall_s"] / max(row["wall_s"], 1e-9), 2)
        row["sampling_speedup"] = round(rows[0]["sampling_s"] / max(row["sampling_s"], 1e-9), 2)
    return {"preset": name, "init_from": source, "tasks": len(tasks), "max_turns": config.max_turns,
            "max_new_tokens_per_turn": config.max_new_tokens_per_turn, "model_compute_dtype": model.cfg.compute_dtype,
            "rollouts": rows}


class _TimedConstraint:
    """A TokenConstraint that adds up the seconds spent computing masks."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def start(self):
        return self.inner.start()

    def advance(self, state, token):
        return self.inner.advance(state, token)

    def allowed(self, state):
        t0 = time.perf_counter()
        try:
            return self.inner.allowed(state)
        finally:
            self.seconds += time.perf_counter() - t0


def bench_constrained(a) -> dict:
    """Free vs JSON-schema constrained greedy decoding of one drafting answer (module docstring)."""
    import json as _json

    from klong_jax.data.trajectory import Message
    from klong_jax.factory.rubric_draft import SYSTEM_PROMPT, step_schema
    from klong_jax.sampling import JsonConstraint, TokenVocab, compile_schema
    from klong_jax.serving import ChatEngine
    from klong_jax.serving.loading import load_serving_model, resolve_tokenizer

    tokenizer = resolve_tokenizer(None, None, a.gguf)
    schema = step_schema("criteria", 3, True)
    question = ("# Paper: Sparse Widgets\n\nWe train sparse widget networks on CIFAR-10 and reach 91% accuracy.\n\n"
                "# Your task\nWrite the leaf criteria of the subtask 'The widget layer is implemented' (at most 3). "
                'Answer {"criteria": [{"requirements": "...", "task_category": "Code Development", '
                '"finegrained_task_category": "Method Implementation", "weight": 1}, ...]}.')
    gen = int(dict(item.split(":") for item in a.gen_tokens.split(",")).get("smol", 192))
    rows = []
    for dtype in a.dtypes.split(","):
        model = load_serving_model(gguf=a.gguf, compute_dtype=dtype)
        sampler = Sampler(model, tokenizer, decode_chunk=32)
        template = ChatEngine(sampler, model_name="bench").template
        ids = template.conversation_ids([Message("system", SYSTEM_PROMPT), Message("user", question)],
                                        add_generation_prompt=True)
        vocab_t0 = time.perf_counter()
        vocab = TokenVocab.from_tokenizer(tokenizer, model.cfg.vocab_size)
        vocab_s = time.perf_counter() - vocab_t0
        grammar = compile_schema(schema)
        row = {"compute_dtype": dtype, "prompt_tokens": len(ids), "max_new_tokens": gen,
               "vocab_build_s": round(vocab_s, 3)}
        for kind in ("free", "constrained"):
            best, out, mask_s = float("inf"), None, 0.0
            for r in range(a.repeats + 1):            # the first run compiles
                # A cold mask cache each run, timed where the sampler asks for masks.
                constraint = _TimedConstraint(JsonConstraint(grammar, vocab, template.stop_ids))
                sp = SamplingParams(max_new_tokens=gen, temperature=0.0, stop_token_ids=tuple(template.stop_ids),
                                    constraint=constraint if kind == "constrained" else None)
                t0 = time.perf_counter()
                c = sampler.generate([ids], sp)[0]
                dt = time.perf_counter() - t0
                if r and dt < best:
                    best, out, mask_s = dt, c, constraint.seconds
            n = len(out.tokens)
            row[kind] = {"s": round(best, 3), "tokens": n, "tokens_per_s": round(n / best, 2),
                         "finish": out.finish_reason}
            if kind == "constrained":
                text = out.text or ""
                row[kind]["mask_ms_per_token"] = round(1000 * mask_s / max(n, 1), 3)
                row[kind]["whole_json_under_schema"] = bool(out.finish_reason == "stop" and grammar.accepts(text))
                try:
                    row[kind]["items"] = len(_json.loads(text)["criteria"])
                except (ValueError, KeyError, TypeError):
                    row[kind]["items"] = None
        row["seconds_per_token_ratio_constrained_over_free"] = round(
            (row["constrained"]["s"] / max(row["constrained"]["tokens"], 1)) /
            (row["free"]["s"] / max(row["free"]["tokens"], 1)), 2)
        rows.append(row)
        print(f"constrained {dtype}: {row}", file=sys.stderr, flush=True)
    return rows


def run(argv):
    p = argparse.ArgumentParser(prog="bench.py sampler")
    p.add_argument("--mode", default="decode", choices=("decode", "rollout", "rollout_config", "constrained"),
                   help="decode: cached vs uncached decoding; rollout: KV-cache reuse across agent turns")
    p.add_argument("--tasks", type=int, default=2, help="rollout: held-out tasks (one episode each)")
    p.add_argument("--max_turns", type=int, default=3, help="rollout: turns per episode at most")
    p.add_argument("--max_new_tokens_per_turn", type=int, default=32, help="rollout: tokens per turn at most")
    p.add_argument("--session_chunk", type=int, default=128, help="rollout: tokens per row of a prefill chunk")
    p.add_argument("--init_from", default="", help="rollout: weights ('' the config's, 'random' random init)")
    p.add_argument("--presets", default="tiny,small", help="model presets or SFT config variants (smol)")
    p.add_argument("--rollouts", default="trainer;config",
                   help="rollout_config: ';'-separated sampler placements, the first the baseline: trainer | config | "
                        "devices=1,dtype=bfloat16,session_chunk=32")
    p.add_argument("--cpu_devices", type=int, default=2, help="rollout_config: emulated CPU devices (the configs' 2)")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--gen_tokens", default="tiny:64,small:32", help="preset:tokens,...")
    p.add_argument("--compute_dtype", default="float32", help="compute dtype (bfloat16 is slow on CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline_repeats", type=int, default=1, help="runs of the (slow) uncached decoder; 0: none")
    p.add_argument("--gguf", default="pretrained:smollm2-135m-instruct", help="constrained: the served model")
    p.add_argument("--dtypes", default="bfloat16,float32", help="constrained: compute dtypes to compare")
    a = p.parse_args(argv)
    if a.mode == "constrained":
        a.gen_tokens = a.gen_tokens if a.gen_tokens != "tiny:64,small:32" else "smol:192"
        a.repeats = min(a.repeats, 2)
        return {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "backend": jax.default_backend(),
                "mode": "constrained", "results": bench_constrained(a)}
    if a.mode == "rollout_config":
        from klong_jax.runtime import setup_devices
        setup_devices(a.cpu_devices)     # before the first use of a device
        names = a.presets.split(",") if a.presets != "tiny,small" else ["smol"]
        rows = [bench_rollout_configs(name, a) for name in names]
        return {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                "backend": jax.default_backend(), "mode": "rollout_config", "results": rows}
    if a.mode == "rollout":
        names = a.presets.split(",") if a.presets != "tiny,small" else ["smol"]
        rows = [bench_rollout(name, a) for name in names]
        return {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                "backend": jax.default_backend(), "mode": "rollout", "results": rows}
    gen = {k: int(v) for k, v in (item.split(":") for item in a.gen_tokens.split(","))}
    rows = []
    for name in a.presets.split(","):
        for b in (int(x) for x in a.batches.split(",")):
            rows.append(bench_one(name, b, a.prompt_len, gen.get(name, 32), a.compute_dtype, a.repeats,
                                  a.baseline_repeats))
            print(f"{name} batch {b}: {rows[-1]}", file=sys.stderr, flush=True)
    return {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "backend": jax.default_backend(),
            "results": rows}
