"""Train-step throughput on the CPU mesh, and what shared-prefix packing buys at equal trained tokens.

    .venv/bin/python launch/bench.py train_step [--models=tiny,small --batch=8 --seq_len=1024 --steps=3
                                                 --cpu_devices=8 --packing_seq_len=2048
                                                 --packing_trajectories=8 (0: skip part 2)
                                                 --attention_impls=blockwise,reference --moe_impls=ragged,dense
                                                 --upcycles=config,0,4:4:2,8:8:2
                                                 --trainable=all,top:4,top:4+embeddings
                                                 --compute_dtypes=float32,bfloat16]

1. For each model preset: tokens/s and MFU of the real jit'd SFT step (explicit shardings, donated state)
   on a random batch, on an fsdp mesh over the devices. MFU = model FLOPs (klong_jax.training.mfu: 6 x active
   matmul parameters + causal attention, per token) / step time / (devices x per-device peak); on CPU the peak
   is a matmul measured in this process. XLA's cost-analysis count is reported beside it, not used.
   --upcycles sweeps how a variant whose base is dense (smol) is upcycled: `config` (its config.model), `0` (the
   dense base), or LAYERS:EXPERTS:TOP_K (the last LAYERS layers become EXPERTS experts, top TOP_K).
   --trainable sweeps what trains (klong_jax/training/trainable.py): `all`, `top:N` (the top N decoder layers and
   the final norm) or `top:N+embeddings`; each row reports trainable_params and the optimizer state's size.
   --compute_dtypes sweeps the compute dtype (parameters and optimizer state stay float32).
2. Packing: the same prefix-heavy synthetic trajectories, split by the same ContextPolicy, packed with
   shared-prefix packing and with plain window packing; the tiny model trains over all rows of each
   (identical loss tokens), and the ratio of the two wall times is the speedup.
"""
import argparse
import os
import tempfile
import time


def _setup(cpu_devices):
    from klong_jax.runtime import setup_devices
    setup_devices(cpu_devices)


def _model_cfg(variant, upcycle="config"):
    """The variant's model config; `upcycle` ("config", "0" or LAYERS:EXPERTS:TOP_K) re-derives it from the
    variant's dense preset with another upcycling."""
    from configs.sft import PRESET, RUNTIME, get_config
    from klong_jax.models import preset
    from klong_jax.models.from_config import model_config_from
    from klong_jax.models.upcycle import UpcycleConfig, upcycled_config
    if upcycle == "config":
        return model_config_from(get_config(variant).model)
    dense = preset(PRESET[variant], **RUNTIME[variant])
    if dense.num_moe_layers:
        raise ValueError(f"--upcycles={upcycle}: variant {variant} is not built from a dense preset")
    if upcycle == "0":
        return dense
    layers, experts, top_k = (int(x) for x in upcycle.split(":"))
    return upcycled_config(dense, UpcycleConfig(layers=layers, experts=experts, top_k=top_k))


def _step_for(variant, mesh, B, T, attention_impl="blockwise", moe_impl="ragged", upcycle="config",
              trainable="all", compute_dtype=""):
    """(step, state, rest, frozen, batch_sh, model_cfg): the jit'd SFT step of the variant's model training
    `trainable` (a TrainableConfig spec), its initial state and frozen params."""
    import jax
    from configs.sft import get_config
    from klong_jax.models import init_model
    from klong_jax.training.optimizer import learning_rate_schedule, make_optimizer
    from klong_jax.training.state import abstract_layout, split_model
    from klong_jax.training.step import batch_shardings, jit_train_step
    from klong_jax.training.trainable import TrainableConfig, plan_for, train_layout
    cfg = get_config(variant)
    model_cfg = _model_cfg(variant, upcycle).replace(attention_impl=attention_impl, moe_impl=moe_impl)
    if compute_dtype:
        model_cfg = model_cfg.replace(compute_dtype=compute_dtype)
    plan = plan_for(TrainableConfig.from_spec(trainable), model_cfg)
    tx = make_optimizer(cfg.optimizer, 100)
    graphdef, abs_params, _, param_sh, rest_sh = abstract_layout(model_cfg, mesh)
    layout = train_layout(plan, abs_params, param_sh, tx, mesh)
    batch_sh = batch_shardings(mesh, (B, T))
    step = jit_train_step(graphdef, tx, learning_rate_schedule(cfg.optimizer, 100), layout.state_sh, rest_sh,
                          batch_sh, micro_batches=1, z_loss_weight=0.0, plan=plan, frozen_sh=layout.frozen_sh)
    with jax.set_mesh(mesh):
        _, params, rest = split_model(init_model(model_cfg, mesh))
        state, frozen = layout.initial(params, tx)
        del params
        rest = jax.device_put(rest, rest_sh)
    return step, state, rest, frozen, batch_sh, model_cfg


def _random_batch(vocab, B, T, shardings):
    import jax
    import numpy as np
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (B, T + 1)).astype(np.int32)
    local = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((B, T), np.int32),
             "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)), "doc_ids": np.ones((B, T), np.int32),
             "window_ids": np.zeros((B, T), np.int32)}
    return {k: jax.device_put(v, shardings[k]) for k, v in local.items()}


def bench_model(variant, mesh, B, T, steps, attention_impl="blockwise", moe_impl="ragged", upcycle="config",
                trainable="all", compute_dtype=""):
    import jax
    from klong_jax.models import count_params
    from klong_jax.training.mfu import compiled_flops, device_peak_flops, train_flops_per_token
    from klong_jax.training.trainable import param_count
    step, state, rest, frozen, batch_sh, model_cfg = _step_for(variant, mesh, B, T, attention_impl, moe_impl,
                                                               upcycle, trainable, compute_dtype)
    batch = _random_batch(model_cfg.vocab_size, B, T, batch_sh)
    with jax.set_mesh(mesh):
        compiled = step.lower(state, rest, batch, frozen).compile()
        state, m = compiled(state, rest, batch, frozen)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = compiled(state, rest, batch, frozen)
        jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    model_flops = train_flops_per_token(model_cfg, T) * B * T
    xla_flops, peak = compiled_flops(compiled), device_peak_flops()
    n = jax.device_count()
    counts = count_params(model_cfg)
    return {"variant": variant, "upcycle": upcycle, "trainable": trainable, "moe_layers": model_cfg.num_moe_layers,
            "total_params": counts["total_params"], "active_params_per_token": counts["active_params_per_token"],
            "trainable_params": param_count(state["params"]), "opt_state_elements": param_count(state["opt_state"]),
            "attention_impl": attention_impl, "moe_impl": moe_impl, "compute_dtype": model_cfg.compute_dtype,
            "batch": B, "seq_len": T,
            "step_time_s": round(dt, 4),
            "tokens_per_s": round(B * T / dt, 1), "model_flops_per_step": model_flops,
            "xla_cost_analysis_flops_per_device": xla_flops, "peak_flops_per_device": peak,
            "mfu": round(model_flops / n / dt / peak, 4)}


def bench_packing(mesh, seq_len, budget, batch, n_traj):
    import jax
    import numpy as np
    from klong_jax.data.context import ContextConfig
    from klong_jax.data.pipeline import DataConfig, make_dataset
    from klong_jax.data.synthetic import synthetic_corpus, texts_of
    from klong_jax.data.train_tokenizer import train_sentencepiece
    from klong_jax.data.trajectory import write_jsonl
    from klong_jax.training.sft import global_batch
    tmp = tempfile.mkdtemp(prefix="bench_pack_")
    corpus = synthetic_corpus(n_traj, seed=0, turns=(10, 20), prefix_words=300, tool_words=(5, 40),
                              reasoning_words=(0, 10), long_tool_words=100)
    path = os.path.join(tmp, "traj.jsonl")
    write_jsonl(path, corpus)
    tok = train_sentencepiece(texts_of(corpus), os.path.join(tmp, "sp.model"), vocab_size=1024)
    step, state, rest, frozen, batch_sh, _ = _step_for("tiny", mesh, batch, seq_len)
    results = {}
    for mode in ("shared_prefix", "standard"):
        cfg = DataConfig(tokenizer=tok, paths=(path,), seq_len=seq_len, batch_size=batch, packing=mode,
                         num_epochs=1, shuffle=False, shard_index=0, shard_count=1, drop_remainder=False,
                         pack_chunk=n_traj, context=ContextConfig(budget_tokens=budget, reserve_tokens=128))
        batches = []
        for b in make_dataset(cfg):
            if b["input_ids"].shape[0] < batch:
                b = {k: np.concatenate([v, np.zeros((batch - v.shape[0],) + v.shape[1:], v.dtype)]) for k, v in b.items()}
            batches.append(b)
        trained = int(sum(b["loss_mask"].sum() for b in batches))
        with jax.set_mesh(mesh):
            compiled = step.lower(state, rest, global_batch(batches[0], batch_sh), frozen).compile()
            st, m = compiled(jax.tree.map(lambda x: x.copy(), state), rest, global_batch(batches[0], batch_sh), frozen)
            jax.block_until_ready(m)
            t0 = time.perf_counter()
            for b in batches:
                st, m = compiled(st, rest, global_batch(b, batch_sh), frozen)
            jax.block_until_ready(m)
        results[mode] = {"batches": len(batches), "trained_tokens": trained,
                         "wall_s": round(time.perf_counter() - t0, 3)}
    results["speedup_shared_prefix_vs_standard"] = round(results["standard"]["wall_s"] /
                                                         results["shared_prefix"]["wall_s"], 3)
    results["equal_trained_tokens"] = results["standard"]["trained_tokens"] == results["shared_prefix"]["trained_tokens"]
    return results


def run(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cpu_devices", type=int, default=8)
    # Comma lists: every model is measured with every attention x MoE implementation (the first pair is the
    # baseline; ratios in "speedup_vs_first" per model).
    ap.add_argument("--attention_impls", default="blockwise")
    ap.add_argument("--moe_impls", default="ragged")
    ap.add_argument("--upcycles", default="config", help="config | 0 | LAYERS:EXPERTS:TOP_K, comma list")
    ap.add_argument("--trainable", default="all", help="all | top:N | top:N+embeddings, comma list")
    ap.add_argument("--compute_dtypes", default="", help="comma list (float32, bfloat16); '': the variant's")
    ap.add_argument("--packing_seq_len", type=int, default=2048)
    ap.add_argument("--packing_budget", type=int, default=1024)
    ap.add_argument("--packing_trajectories", type=int, default=8)
    args = ap.parse_args(argv)
    _setup(args.cpu_devices)
    import jax
    from klong_jax.sharding import make_mesh
    mesh = make_mesh({"fsdp": -1})
    models = []
    for variant in [v for v in args.models.split(",") if v]:
        runs = [bench_model(variant, mesh, args.batch, args.seq_len, args.steps, a, m, u, t, d)
                for u in args.upcycles.split(",") for t in args.trainable.split(",")
                for a in args.attention_impls.split(",") for m in args.moe_impls.split(",")
                for d in args.compute_dtypes.split(",")]
        for r in runs:
            r["speedup_vs_first"] = round(runs[0]["step_time_s"] / r["step_time_s"], 3)
        models += runs
    out = {"backend": jax.default_backend(), "devices": jax.device_count(), "mesh": dict(mesh.shape),
           "models": models}
    if args.packing_trajectories > 0:  # 0: skip the packing comparison
        out["packing"] = bench_packing(mesh, args.packing_seq_len, args.packing_budget, args.batch,
                                       args.packing_trajectories)
    return out
