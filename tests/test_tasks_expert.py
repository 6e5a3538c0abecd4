"""The scripted expert in a real sandbox: it solves tasks, its trajectories are valid, grading gives
partial credit, and the generator CLI writes the set."""
import json

import pytest

from klong_jax.data.trajectory import validate_file, validate_trajectory
from klong_jax.sandbox import Sandbox
from klong_jax.tasks import generate_task, grade_episode, load_task, run_expert, solve_task
from klong_jax.tasks.generate import main as generate_main


def _assert_one_call_per_turn(trajectory):
    messages = trajectory["messages"]
    assert [m["role"] for m in messages[:2]] == ["system", "user"]
    for i, m in enumerate(messages[2:], 2):
        if m["role"] == "assistant":
            assert len(m["tool_calls"]) == 1 and m["reasoning"]
            assert messages[i + 1]["role"] == "tool"
            assert messages[i + 1]["tool_call_id"] == m["tool_calls"][0]["id"]


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_expert_solves_tasks_with_mistakes_and_repairs(tmp_path, difficulty):
    task = generate_task(1, seed=9, difficulty=difficulty)
    trajectory = solve_task(task, tmp_path / "episode", mistake_prob=0.5, seed=1)
    assert trajectory["reward"] == 1.0
    assert validate_trajectory(trajectory) == []
    _assert_one_call_per_turn(trajectory)
    assert trajectory["meta"]["submitted"] and trajectory["meta"]["n_mistakes"] > 0
    assert trajectory["messages"][-2]["tool_calls"][0]["name"] == "submit"
    observations = [m["content"] for m in trajectory["messages"] if m["role"] == "tool"]
    # A slip shows up as a real failure in the observations, and the expert carries on.
    assert any("[exit code" in text for text in observations)
    assert trajectory["messages"][1]["content"] == task.spec


def test_expert_trajectory_is_deterministic(tmp_path):
    task = generate_task(0, seed=1, difficulty=3)
    first = solve_task(task, tmp_path / "a", mistake_prob=0.3, seed=2)
    second = solve_task(task, tmp_path / "b", mistake_prob=0.3, seed=2)
    assert json.dumps(first) == json.dumps(second)


def test_half_done_episode_gets_partial_credit(tmp_path):
    task = generate_task(2, seed=0, difficulty=2)
    episode_dir = tmp_path / "episode"
    task.setup(episode_dir)
    with Sandbox(episode_dir) as sandbox:
        assert grade_episode(task, sandbox) == 0.0  # doing nothing earns nothing
        half = len(task.expert_plan()) // 2
        trajectory = run_expert(task, sandbox, mistake_prob=0.0, max_actions=half)
    assert 0.0 < trajectory["reward"] < 1.0
    assert not trajectory["meta"]["submitted"]
    assert validate_trajectory(trajectory) == []


def test_generate_cli_writes_tasks_and_graded_trajectories(tmp_path, capsys):
    out = tmp_path / "set"
    assert generate_main([f"--out={out}", "--n=2", "--seed=4", "--split=heldout", "--length=10"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trajectories"] == 2 and summary["reward_min"] == 1.0
    task_dirs = sorted((out / "tasks").iterdir())
    assert [d.name for d in task_dirs] == ["heldout-4-0000", "heldout-4-0001"]
    for task_dir in task_dirs:
        assert load_task(task_dir).spec == (task_dir / "prefix.md").read_text()
    assert validate_file(str(out / "trajectories.jsonl")) == []
    lines = (out / "trajectories.jsonl").read_text().splitlines()
    assert [json.loads(line)["task_id"] for line in lines] == [d.name for d in task_dirs]
    assert not (out / "episodes").exists()


def test_generating_in_worker_processes_writes_the_same_set(tmp_path):
    from klong_jax.tasks.generate import generate_dataset
    serial = generate_dataset(tmp_path / "serial", n=5, seed=3, length=6, mistake_prob=0.5)
    parallel = generate_dataset(tmp_path / "parallel", n=5, seed=3, length=6, mistake_prob=0.5, workers=2)
    assert {k: v for k, v in serial.items() if k != "out"} == {k: v for k, v in parallel.items() if k != "out"}
    assert (tmp_path / "serial" / "trajectories.jsonl").read_text() == \
        (tmp_path / "parallel" / "trajectories.jsonl").read_text()


def test_expert_refuses_an_episode_that_was_not_set_up(tmp_path):
    task = generate_task(0, difficulty=2)
    with Sandbox(tmp_path / "episode") as sandbox:
        with pytest.raises(ValueError, match="call task.setup"):
            run_expert(task, sandbox)
