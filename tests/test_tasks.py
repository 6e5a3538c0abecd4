"""The embedded task suite without a sandbox: generation, knobs, rubrics, saving and loading."""
import json
import subprocess
import sys

import pytest

from klong_jax.rubric import FINEGRAINED_CATEGORIES, LEAF_CATEGORIES, load_rubric, parse_rubric
from klong_jax.tasks import generate_task, generate_tasks, load_task, save_task
from klong_jax.tasks.kinds import KINDS_BY_DIFFICULTY


def _fingerprint(task) -> str:
    return json.dumps([task.to_json(), task.spec, task.rubric], sort_keys=True)


def test_generation_is_deterministic_per_seed():
    first = [_fingerprint(t) for t in generate_tasks(3, seed=7, split="train")]
    second = [_fingerprint(t) for t in generate_tasks(3, seed=7, split="train")]
    assert first == second


def test_task_i_does_not_depend_on_n():
    assert _fingerprint(generate_tasks(2, seed=3)[1]) == _fingerprint(generate_tasks(5, seed=3)[1])


def test_seeds_and_splits_give_different_tasks():
    train = {t.spec for t in generate_tasks(12, seed=0, split="train")}
    other_seed = {t.spec for t in generate_tasks(12, seed=1, split="train")}
    heldout = {t.spec for t in generate_tasks(12, seed=0, split="heldout")}
    assert len(train) == len(other_seed) == len(heldout) == 12
    assert not train & heldout
    assert not train & other_seed
    assert generate_task(0, split="train").task_id != generate_task(0, split="heldout").task_id


@pytest.mark.parametrize("difficulty", [1, 2, 3])
@pytest.mark.parametrize("length", [4, 24, 72])
def test_every_rubric_validates(difficulty, length):
    for task in generate_tasks(3, seed=11, difficulty=difficulty, length=length):
        root = parse_rubric(task.rubric, source=task.task_id)  # ids unique, weights, categories
        assert root.weight > 0 and len(root.sub_tasks) == len(task.sections)
        for section in root.sub_tasks:
            assert section.sub_tasks and section.weight > 0 and section.check is None
        for leaf in root.leaves():
            assert leaf.check and leaf.check.strip()
            assert leaf.task_category in LEAF_CATEGORIES
            assert leaf.finegrained_task_category in FINEGRAINED_CATEGORIES
            assert leaf.weight >= 1


def test_length_knob_scales_steps_and_tool_calls():
    def mean_sizes(length):
        tasks = generate_tasks(6, seed=2, length=length)
        leaves = sum(len(list(parse_rubric(t.rubric).leaves())) for t in tasks) / len(tasks)
        calls = sum(len(t.expert_plan()) for t in tasks) / len(tasks)
        return leaves, calls

    short, default, long = mean_sizes(8), mean_sizes(24), mean_sizes(48)
    assert short[0] < default[0] < long[0]
    assert short[1] < default[1] < long[1]
    assert default[1] >= 30  # tens of tool calls at the default length


def test_difficulty_knob_selects_kinds_and_operations():
    easy_kinds = {s["kind"] for t in generate_tasks(10, difficulty=1) for s in t.sections}
    assert easy_kinds <= set(KINDS_BY_DIFFICULTY[1])
    hard = generate_tasks(10, difficulty=3, length=40)
    hard_kinds = {s["kind"] for t in hard for s in t.sections}
    assert {"stats", "function"} <= hard_kinds
    ops = {stat["op"] for t in hard for s in t.sections if s["kind"] == "stats" for stat in s["stats"]}
    assert "sum_where" in ops
    easy_ops = {stat["op"] for t in generate_tasks(10, difficulty=2, length=40)
                for s in t.sections if s["kind"] == "stats" for stat in s["stats"]}
    assert "sum_where" not in easy_ops


def test_spec_names_every_item_the_rubric_checks():
    for task in generate_tasks(4, seed=5, difficulty=3):
        for section in task.sections:
            if section["kind"] == "files":
                needed = [f["path"] for f in section["files"]] + [f["line"] for f in section["files"]]
            elif section["kind"] == "append":
                needed = [section["file"], *section["rows"]]
            elif section["kind"] == "rename":
                needed = [m["src"] for m in section["moves"]] + [m["dst"] for m in section["moves"]]
            elif section["kind"] == "stats":
                needed = [section["csv"], section["out"], *(s["key"] for s in section["stats"])]
            else:
                needed = [section["module"], *(f["name"] for f in section["functions"])]
            for text in needed:
                assert f"`{text}" in task.spec, (task.task_id, text)


def test_knobs_are_validated():
    with pytest.raises(ValueError, match="split"):
        generate_tasks(1, split="test")
    with pytest.raises(ValueError, match="difficulty"):
        generate_tasks(1, difficulty=4)
    with pytest.raises(ValueError, match="length"):
        generate_tasks(1, length=2)


def test_save_and_load_round_trip(tmp_path):
    task = generate_task(3, seed=4, difficulty=3)
    task_dir = save_task(task, tmp_path / "tasks")
    assert sorted(p.name for p in task_dir.iterdir()) == ["prefix.md", "rubric.json", "task.json"]
    loaded = load_task(task_dir)
    assert _fingerprint(loaded) == _fingerprint(task)
    assert loaded.rubric_path == task_dir / "rubric.json"
    assert load_rubric(loaded.rubric_path).to_dict() == task.rubric
    assert [a.arguments for a in loaded.expert_plan()] == [a.arguments for a in task.expert_plan()]


def test_load_task_names_the_bad_file_and_field(tmp_path):
    task_dir = save_task(generate_task(0), tmp_path)
    (task_dir / "prefix.md").unlink()
    with pytest.raises(FileNotFoundError, match="prefix.md"):
        load_task(task_dir)
    task_dir = save_task(generate_task(1), tmp_path)
    (task_dir / "rubric.json").write_text('{"id": "x",\n  oops}')
    with pytest.raises(ValueError, match=r"rubric.json: line 2"):
        load_task(task_dir)
    task_dir = save_task(generate_task(2), tmp_path)
    meta = json.loads((task_dir / "task.json").read_text())
    meta["sections"][1]["kind"] = "juggle"
    (task_dir / "task.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"task.json: sections\[1\].*juggle"):
        load_task(task_dir)


def test_setup_materialises_initial_files(tmp_path):
    task = generate_task(0, difficulty=3, length=40)
    files = task.initial_files()
    assert files  # this task has CSVs, test scripts or files to move
    task.setup(tmp_path / "episode")
    for relative, content in files.items():
        assert (tmp_path / "episode" / relative).read_text() == content


def test_tasks_package_imports_no_jax():
    code = ("import sys, klong_jax.tasks, klong_jax.tasks.generate; "
            "assert not [m for m in sys.modules if m == 'jax' or m.startswith('jax.')], 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PATH": "/usr/bin:/bin"})
