"""The embedded task suite: procedurally generated long-horizon tasks a tiny model can learn on a CPU.

A task is a small "paper" (prefix.md: a spec of a few sections, each a list of exact items), a rubric
tree in the PaperBench format whose leaves carry shell `check` commands, and initial files. Sections
come from a small grammar of kinds (kinds/): create files, append CSV rows, move files per a table,
compute CSV statistics, implement functions so given tests pass. Knobs: `difficulty` (1-3: which
kinds, statistics and function templates occur) and `length` (rubric items per task, ~ steps).

    tasks = generate_tasks(n, seed=0, split="train", difficulty=2, length=24)
    task = load_task("DIR/tasks/<task_id>")        # Task: .spec, .rubric, .rubric_path, .setup(dir)
    with Sandbox(episode_dir) as sb:                # task.setup(episode_dir) first
        trajectory = run_expert(task, sb, mistake_prob=0.1)
    observation = execute_tool(sb, "read_file_chunk", {"file": "a.txt", "start_line": 1})

PaperBench paper directories are tasks too (klong_jax.tasks.paperbench):

    tasks = load_tasks(DIR, judge=JudgeEndpoint(url, model))   # embedded task dirs and paper dirs alike

Trajectory (one JSON line): {"id", "task_id", "messages": [{"role": "system"|"user"|"assistant"|"tool",
"content", "reasoning"?, "tool_calls"?: [{"id", "name", "arguments": {...}}], "tool_call_id"?}],
"meta", "reward"}. CLI: python -m klong_jax.tasks.generate --out=DIR --n=8 [--seed --split ...].
Imports no JAX.
"""
from klong_jax.tasks.expert import ExpertError, run_expert, solve_task
from klong_jax.tasks.grading import grade_episode
from klong_jax.tasks.task import Task, generate_task, generate_tasks, load_task, save_task
from klong_jax.tasks.tools import (TOOL_NAMES, TOOL_SPECS, blacklist_hit, execute_tool, run_tool,
                                    system_prompt)
from klong_jax.tasks.paperbench import (JudgeEndpoint, PaperTask, PaperTaskError, find_task_dirs,
                                        is_paper_dir, load_paper_task, load_tasks)

__all__ = ["ExpertError", "JudgeEndpoint", "PaperTask", "PaperTaskError", "TOOL_NAMES", "TOOL_SPECS", "Task",
           "blacklist_hit", "execute_tool", "find_task_dirs", "generate_task", "generate_tasks",
           "grade_episode", "is_paper_dir", "load_paper_task", "load_task", "load_tasks", "run_expert",
           "run_tool", "save_task", "solve_task", "system_prompt"]
