"""Grading an episode of a task with its rubric: every leaf's `check` runs in the episode's sandbox
(a PaperTask grades itself: klong_jax.tasks.paperbench)."""
from klong_jax.rubric import CommandJudge, GradeResult, GradingContext, grade, parse_rubric
from klong_jax.tasks.task import Task

CHECK_TIMEOUT_S = 30.0  # the checks are greps and tiny scripts; far more than they need


def grade_episode_result(task: Task, sandbox, check_timeout_s: float = CHECK_TIMEOUT_S) -> GradeResult:
    """The whole grading tree (per-node scores and check outputs) of the episode in `sandbox`. A task with
    its own grading (a PaperTask: `grade_result(sandbox, check_timeout_s)`) is graded by it."""
    own = getattr(task, "grade_result", None)
    if own is not None:
        return own(sandbox, check_timeout_s)
    rubric = parse_rubric(task.rubric, source=str(task.rubric_path or f"<rubric of {task.task_id}>"))
    judge = CommandJudge(sandbox, timeout_s=check_timeout_s)
    return grade(rubric, judge, GradingContext(sandbox.episode_dir, task=task.spec))


def grade_episode(task: Task, sandbox, check_timeout_s: float = CHECK_TIMEOUT_S,
                  strict: bool = True) -> float:
    """The rubric score in [0, 1] of the episode in `sandbox` (the RL reward).

    strict: raise if any leaf could not be graded (a check timed out or the sandbox failed) rather
    than count it as 0; use grade_episode_result to see such leaves without raising."""
    result = grade_episode_result(task, sandbox, check_timeout_s)
    if strict and not result.valid:
        bad = [leaf for leaf in result.leaves() if not leaf.valid]
        raise RuntimeError(f"task {task.task_id}: {len(bad)} rubric leaf grading(s) invalid; first: "
                           f"{bad[0].requirements}: {bad[0].explanation}")
    return result.score
