"""Where one progressive-RL step spends its time: rollout (sampling, tool calls), grading, update.

    .venv/bin/python launch/bench.py rl_step [--config=configs/rl_stage1.py:tiny --steps=3 --cpu_devices=2
                                              --init_from=DIR --override=rl.group_size=4 ...]

Runs the real RL stage (`klong_jax.rl.loop.run_rl`: KV-cache sampler, agent, sandbox, rubric grading,
advantage, packed windows, the jit'd update and the weight hand-over) for `steps` steps on the embedded
task suite in a temporary workdir, and reads the per-step phase times from the stage's metrics. The first
step compiles the sampler and the update functions and is reported apart; the steady-state figures are
the mean over the later steps, with each phase's share of the step.
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


def run(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/rl_stage1.py:tiny")
    ap.add_argument("--steps", type=int, default=3, help="RL steps; the first (compiling) is reported apart")
    ap.add_argument("--cpu_devices", type=int, default=2)
    ap.add_argument("--init_from", default="", help="a trained stage's workdir or an HF/Orbax model ('' random)")
    ap.add_argument("--override", action="append", default=[], help="key=value on the config, repeatable")
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
    run_rl(cfg, workdir, prepare_embedded(cfg.data.embedded))
    wall = time.perf_counter() - t0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {"backend": jax.default_backend(), "devices": jax.device_count(), "config": args.config,
            "init_from": args.init_from or "random", "steps": args.steps,
            "tasks_per_step": cfg.rl.tasks_per_step, "group_size": cfg.rl.group_size,
            "timeout_s": cfg.agent.timeout_s, "max_turns": cfg.agent.max_turns,
            "first_step": _phase_means(rows[:1]), "steady_state": _phase_means(rows[1:]),
            "total_wall_s": round(wall, 1), "workdir": workdir}
