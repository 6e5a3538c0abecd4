"""Write a task set and its expert trajectories.

    python -m klong_jax.tasks.generate --out=DIR --n=8 [--seed=0 --split=train|heldout
        --difficulty=1|2|3 --length=24 --mistake_prob=0.1 --per_task=1 --keep_episodes --workers=1]

writes DIR/tasks/<task_id>/{task.json, prefix.md, rubric.json}, DIR/trajectories.jsonl (one graded
expert trajectory per line) and DIR/summary.json, and prints the summary. Everything is a
deterministic function of the arguments (the embedded set is generated at run time, never committed).
Needs root: the expert's commands run in the sandbox.
"""
import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import pathlib
import shutil
import statistics
import sys

from klong_jax.tasks.expert import solve_task
from klong_jax.tasks.task import DIFFICULTIES, SPLITS, generate_tasks, save_task


def trajectory_stats(trajectories: list[dict]) -> dict:
    """Sizes of a trajectory set: characters (JSON of all messages) and assistant turns."""
    chars = [sum(len(json.dumps(m)) for m in t["messages"]) for t in trajectories]
    turns = [sum(1 for m in t["messages"] if m["role"] == "assistant") for t in trajectories]
    rewards = [t["reward"] for t in trajectories]
    return {
        "trajectories": len(trajectories),
        "chars_median": statistics.median(chars) if chars else 0,
        "chars_min": min(chars, default=0), "chars_max": max(chars, default=0),
        "turns_median": statistics.median(turns) if turns else 0,
        "turns_min": min(turns, default=0), "turns_max": max(turns, default=0),
        "reward_mean": statistics.fmean(rewards) if rewards else 0.0,
        "reward_min": min(rewards, default=0.0),
        "mistakes_total": sum(t["meta"]["n_mistakes"] for t in trajectories),
    }


def _solve_job(job: tuple) -> dict:
    task, episode_dir, mistake_prob, expert_seed = job
    return solve_task(task, episode_dir, mistake_prob=mistake_prob, seed=expert_seed)


def generate_dataset(out: str | pathlib.Path, n: int, seed: int = 0, split: str = "train",
                     difficulty: int = 2, length: int = 24, mistake_prob: float = 0.1,
                     per_task: int = 1, keep_episodes: bool = False, workers: int = 1) -> dict:
    """Generate, save and solve `n` tasks into `out`; returns the summary (also in summary.json).
    workers > 1 solves tasks in that many processes (each expert episode is a real sandbox, mostly
    waiting on its shell commands); the output is identical, in the same order."""
    out = pathlib.Path(out)
    if per_task < 1:
        raise ValueError(f"per_task must be >= 1, got {per_task}")
    tasks = generate_tasks(n, seed=seed, split=split, difficulty=difficulty, length=length)
    episodes = out / "episodes"
    shutil.rmtree(episodes, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        save_task(task, out / "tasks")
    jobs = [(task, episodes / f"{task.task_id}-{expert_seed}", mistake_prob, expert_seed)
            for task in tasks for expert_seed in range(per_task)]
    trajectories = []
    with open(out / "trajectories.jsonl", "w") as lines, _job_map(workers) as job_map:
        for trajectory in job_map(_solve_job, jobs):
            lines.write(json.dumps(trajectory) + "\n")
            trajectories.append(trajectory)
    if not keep_episodes:
        shutil.rmtree(episodes, ignore_errors=True)
    summary = {"out": str(out), "n_tasks": n, "seed": seed, "split": split, "difficulty": difficulty,
               "length": length, "mistake_prob": mistake_prob, **trajectory_stats(trajectories)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


@contextlib.contextmanager
def _job_map(workers: int):
    """An ordered map over the jobs: in this process, or in `workers` spawned ones (spawned, not forked:
    the caller may hold JAX's threads)."""
    if workers <= 1:
        yield map
        return
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield lambda fn, jobs: pool.map(fn, jobs, chunksize=4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m klong_jax.tasks.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n", type=int, default=8, help="number of tasks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--difficulty", type=int, choices=DIFFICULTIES, default=2)
    parser.add_argument("--length", type=int, default=24, help="rubric items (steps) per task")
    parser.add_argument("--mistake_prob", type=float, default=0.1,
                        help="probability that the expert slips on a call that allows it")
    parser.add_argument("--per_task", type=int, default=1, help="expert trajectories per task")
    parser.add_argument("--keep_episodes", action="store_true",
                        help="keep the episode directories under OUT/episodes")
    parser.add_argument("--workers", type=int, default=1, help="processes solving tasks in parallel")
    args = parser.parse_args(argv)
    summary = generate_dataset(args.out, args.n, args.seed, args.split, args.difficulty, args.length,
                               args.mistake_prob, args.per_task, args.keep_episodes, args.workers)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
