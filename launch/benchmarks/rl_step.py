"""Where one progressive-RL step spends its time: rollout (sampling, tool calls), grading, update.

    .venv/bin/python launch/bench.py rl_step [--config=configs/rl_stage1.py:tiny --steps=3 --cpu_devices=2
                                              --init_from=DIR --override=rl.group_size=4 ...]

Runs the real RL stage (`klong_jax.rl.loop.run_rl`: KV-cache sampler, agent, sandbox, rubric grading,
advantage, packed windows, the jit'd update and the weight hand-over) for `steps` steps on the embedded
task suite in a temporary workdir, and reads the per-step phase times from the stage's metrics. The first
step compiles the sampler and the update functions and is reported apart; the steady-state figures are
the mean over the later steps, with each phase's share of the step. The update is also timed on its own
(`time_update`), since a policy whose episodes all score alike gives the loop nothing to update on.
"""
import argparse
import json
import os
import tempfile
import time

PHASES = ("rollout_sampling_s", "rollout_tools_s", "rollout_grading_s", "update_time_s")


def _load_config(spec: str, overrides: list[str]):
    import importlib.util
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(variant or "tiny")
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        target = cfg
        for part in parents:
            target = target[part]
        if leaf not in target:
            raise KeyError(f"--override {key}: no such field; {sorted(target.keys())}")
        old = target[leaf]
        target[leaf] = value in ("1", "true", "True") if isinstance(old, bool) else type(old)(value)
    return cfg


def _phase_means(rows: list[dict]) -> dict:
    out = {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in PHASES}
    out["step_s"] = sum(out[k] for k in PHASES)
    out["share"] = {k: round(out[k] / out["step_s"], 3) for k in PHASES}
    out["episodes"] = rows[0].get("episodes")
    out["tokens_mean"] = sum(r.get("tokens_mean", 0.0) for r in rows) / len(rows)
    out["turns_mean"] = sum(r.get("turns_mean", 0.0) for r in rows) / len(rows)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def time_update(cfg, data_paths: dict, workdir: str, repeats: int) -> dict:
    """The update phase alone, on the rows of one real rollout of the stage's size.

    The loop updates only on groups whose rewards differ; a weak policy (every episode scoring the same)
    gives none, and the loop's update time is then 0. Here the same rollout's episodes get advantages
    +1 / -1 alternately within each group, so the packed rows, the old-log-prob pass with routing replay
    and the clipped update run exactly as the loop runs them."""
    import jax

    from klong_jax.agent import run_episodes
    from klong_jax.rl.batch import build_rows
    from klong_jax.rl.loop import setup_stage, update_policy
    from klong_jax.sandbox import SandboxPool
    rl = cfg.rl
    st = setup_stage(cfg, data_paths)
    with jax.set_mesh(st.mesh):
        state, rest = st.initial_state(cfg, workdir)
        results = run_episodes(st.tasks[:rl.tasks_per_step], st.policy(cfg, state, rest), n_per_task=rl.group_size,
                               template=st.template, config=st.agent_cfg,
                               pool=SandboxPool(max_concurrent=rl.max_concurrent_episodes),
                               workdir=os.path.join(workdir, "update_rollout"), return_routing=True,
                               return_prompt_routing=True)
        advantages = {r.episode_id: 1.0 if r.group_index % 2 == 0 else -1.0 for r in results}
        rows, stats = build_rows(results, advantages, seq_len=rl.seq_len, pad_id=st.tokenizer.pad_id,
                                 num_moe_layers=st.model_cfg.num_moe_layers,
                                 top_k=st.model_cfg.num_experts_per_tok, packing=rl.packing)
        times, first = [], None
        for _ in range(repeats + 1):   # the first call compiles
            t0 = time.perf_counter()
            state, metrics = update_policy(st.update_fn, st.old_fn, state, rest, state["params"], rows, rl, st.mesh,
                                           st.batch_spec)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
            first = first or metrics   # log-prob mismatch against the sampler's weights: before any update
    return {"episodes": len(results), "windows": stats.windows, "rows": len(rows), "seq_len": rl.seq_len,
            "ppo_epochs": rl.ppo_epochs, "first_update_s": round(times[0], 3),
            "update_s": round(sum(times[1:]) / repeats, 3),
            # rl.replay_gap=False computes only the log-probs the update uses: the other mismatch is absent (None).
            **{k: round(first[k], 6) if k in first else None
               for k in ("mismatch_with_replay", "mismatch_without_replay")}}


def run(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/rl_stage1.py:tiny")
    ap.add_argument("--steps", type=int, default=3, help="RL steps; the first (compiling) is reported apart")
    ap.add_argument("--cpu_devices", type=int, default=2)
    ap.add_argument("--init_from", default="", help="a trained stage's workdir or an HF/Orbax model ('' random)")
    ap.add_argument("--override", action="append", default=[], help="key=value on the config, repeatable")
    ap.add_argument("--update_repeats", type=int, default=2, help="timed updates after the compiling one")
    args = ap.parse_args(argv)
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (the first step compiles)")
    from klong_jax.runtime import setup_devices
    setup_devices(args.cpu_devices)
    import jax

    from klong_jax.rl.loop import run_rl
    from klong_jax.training.embedded_data import prepare_embedded
    cfg = _load_config(args.config, args.override)
    cfg.rl.steps = args.steps
    cfg.init_from = os.path.abspath(args.init_from) if args.init_from else ""
    workdir = tempfile.mkdtemp(prefix="bench_rl_")
    t0 = time.perf_counter()
    data_paths = prepare_embedded(cfg.data.embedded)
    run_rl(cfg, workdir, data_paths)
    wall = time.perf_counter() - t0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {"backend": jax.default_backend(), "devices": jax.device_count(), "config": args.config,
            "init_from": args.init_from or "random", "steps": args.steps,
            "tasks_per_step": cfg.rl.tasks_per_step, "group_size": cfg.rl.group_size,
            "timeout_s": cfg.agent.timeout_s, "max_turns": cfg.agent.max_turns,
            "first_step": _phase_means(rows[:1]), "steady_state": _phase_means(rows[1:]),
            "update_on_forced_advantages": time_update(cfg, data_paths, os.path.join(workdir, "forced"),
                                                       args.update_repeats),
            "total_wall_s": round(wall, 1), "workdir": workdir}
