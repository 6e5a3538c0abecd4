"""The scripted expert: carries a task out in a real sandbox and records the trajectory.

Every observation in the trajectory is the real output of the call. With probability `mistake_prob`
per planned call that has a plausible slip, the expert first makes the slip (a misspelt command or
path, a buggy function body), sees it fail, looks around when that helps, and then makes the planned
call with a reasoning that names the fix.
"""
import dataclasses
import pathlib
import random

from klong_jax.sandbox import Sandbox, SandboxLimits
from klong_jax.tasks import grading, tools
from klong_jax.tasks.kinds.base import Action
from klong_jax.tasks.task import Task


class ExpertError(RuntimeError):
    """The sandbox did not behave as the task generator planned: a bug in a task kind."""


class _Recorder:
    def __init__(self, sandbox, task: Task):
        self.sandbox = sandbox
        self.task = task
        self.messages: list[dict] = [
            {"role": "system", "content": tools.system_prompt()},
            {"role": "user", "content": task.spec},
        ]
        self.n_calls = 0
        self.submitted = False

    def call(self, action: Action) -> tools.ToolResult:
        self.n_calls += 1
        call_id = f"call_{self.n_calls:03d}"
        self.messages.append({
            "role": "assistant", "content": action.content, "reasoning": action.reasoning,
            "tool_calls": [{"id": call_id, "name": action.tool, "arguments": dict(action.arguments)}],
        })
        result = tools.run_tool(self.sandbox, action.tool, action.arguments)
        self.messages.append({"role": "tool", "content": result.observation, "tool_call_id": call_id})
        self.submitted = self.submitted or result.submitted
        return result

    def fail(self, action: Action, result: tools.ToolResult, why: str) -> ExpertError:
        return ExpertError(f"task {self.task.task_id}: {why}: {action.tool}({action.arguments!r}) "
                           f"gave:\n{result.observation}")

    def planned(self, action: Action) -> None:
        result = self.call(action)
        if not result.ok:
            raise self.fail(action, result, "a planned call failed")
        if action.expect is not None and result.observation.strip() != action.expect:
            raise self.fail(action, result, f"expected the output {action.expect!r}")

    def slip(self, action: Action, rng: random.Random) -> Action:
        """Make one of `action`'s planned mistakes; returns the corrected call to make next."""
        mistake = rng.choice(action.mistakes)
        for i, wrong in enumerate(mistake.wrong):
            if i == 0:
                # The section's opening remark goes with its first call, even when that one is a slip.
                wrong = dataclasses.replace(wrong, content=action.content)
            result = self.call(wrong)
            is_last = i == len(mistake.wrong) - 1
            if result.ok == is_last:
                raise self.fail(wrong, result, "a planned mistake did not go as planned")
        if mistake.inspect is not None:
            self.planned(mistake.inspect)
        return dataclasses.replace(action.with_reasoning(mistake.repair_reasoning), content="")


def _check_set_up(task: Task, sandbox) -> None:
    """The episode must start fresh from task.setup(), run before the Sandbox was created (the Sandbox
    hands the directory to its user; files written later as root could not be changed by commands)."""
    root = pathlib.Path(sandbox.episode_dir)
    for relative in task.initial_files():
        path = root / relative
        if not path.is_file():
            raise ValueError(f"task {task.task_id}: {path} is missing: call task.setup(episode_dir) "
                             "before running the expert")
        if path.stat().st_uid != sandbox.uid:
            raise ValueError(f"task {task.task_id}: {path} does not belong to the sandbox user: call "
                             "task.setup(episode_dir) before creating the Sandbox")


def run_expert(task: Task, sandbox, *, mistake_prob: float = 0.1, seed: int = 0,
               max_actions: int | None = None, grade: bool = True) -> dict:
    """Run the expert on `task` in `sandbox`, whose episode directory the caller has set up with
    `task.setup(sandbox.episode_dir)`. Returns the trajectory dict (format: see klong_jax.tasks),
    with `reward` (the rubric score in the episode directory) when `grade` is set.

    max_actions stops the expert after that many planned calls (without submitting): a half-done
    episode for partial-credit tests and RL baselines.
    """
    if not 0.0 <= mistake_prob <= 1.0:
        raise ValueError(f"mistake_prob must be in [0, 1], got {mistake_prob}")
    _check_set_up(task, sandbox)
    rng = random.Random(f"klong-expert/{task.task_id}/{seed}")
    recorder = _Recorder(sandbox, task)
    n_mistakes = 0
    plan = task.expert_plan()
    if max_actions is not None:
        plan = plan[:max_actions]
    for action in plan:
        if action.mistakes and rng.random() < mistake_prob:
            action = recorder.slip(action, rng)
            n_mistakes += 1
        recorder.planned(action)
    trajectory = {
        "id": f"{task.task_id}-expert-{seed}",
        "task_id": task.task_id,
        "messages": recorder.messages,
        "meta": {"source": "scripted_expert", "split": task.split, "seed": task.seed,
                 "difficulty": task.difficulty, "length": task.length, "expert_seed": seed,
                 "mistake_prob": mistake_prob, "n_mistakes": n_mistakes,
                 "n_tool_calls": recorder.n_calls, "submitted": recorder.submitted},
    }
    if grade:
        trajectory["reward"] = grading.grade_episode(task, sandbox)
    return trajectory


def solve_task(task: Task, episode_dir: str | pathlib.Path, *, mistake_prob: float = 0.1, seed: int = 0,
               max_actions: int | None = None, limits: SandboxLimits | None = None) -> dict:
    """Set up `task` in a fresh `episode_dir`, run the expert in a sandbox there, grade, close."""
    episode_dir = pathlib.Path(episode_dir)
    if episode_dir.exists() and any(episode_dir.iterdir()):
        raise ValueError(f"episode directory {episode_dir} is not empty")
    task.setup(episode_dir)
    with Sandbox(episode_dir, limits=limits) as sandbox:
        return run_expert(task, sandbox, mistake_prob=mistake_prob, seed=seed, max_actions=max_actions)
