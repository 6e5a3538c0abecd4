"""Rubric loading, validation, variants and score aggregation (hand-computed scores)."""
import json
import os
import warnings

import pytest

from klong_jax.rubric import (GradingContext, LeafVerdict, RecordedJudge, RubricError, code_dev_variant,
                              duplicate_ids, files_touched, grade, load_rubric, parse_rubric,
                              resources_provided_variant, snapshot_files)


def leaf(id_, weight, category, finegrained=None, **extra):
    node = {"id": id_, "requirements": f"requirement {id_}", "weight": weight, "sub_tasks": [],
            "task_category": category, **extra}
    if finegrained is not None:
        node["finegrained_task_category"] = finegrained
    return node


def node(id_, weight, children, **extra):
    # Internal nodes as PaperBench ships them: task_category null, finegrained absent.
    return {"id": id_, "requirements": f"requirement {id_}", "weight": weight, "sub_tasks": children,
            "task_category": None, **extra}


# root
#  A (w2) = (1*a1 + 3*a2) / 4
#    a1 (w1, Code Development, Method Implementation)
#    a2 (w3, Code Execution, Experimental Setup)
#  B (w1) = (2*b1 + 1*b2 + 1*b3) / 4
#    b1 (w2, Code Development, Dataset and Model Acquisition)
#    b2 (w1, Result Analysis, Logging, Analysis & Presentation)
#    b3 (w1, Code Development, Method Implementation)
#  c (w1, Result Analysis)
TREE = node("root", 1, [
    node("A", 2, [leaf("a1", 1, "Code Development", "Method Implementation"),
                  leaf("a2", 3, "Code Execution", "Experimental Setup")]),
    node("B", 1, [leaf("b1", 2, "Code Development", "Dataset and Model Acquisition"),
                  leaf("b2", 1, "Result Analysis", "Logging, Analysis & Presentation"),
                  leaf("b3", 1, "Code Development", "Method Implementation")]),
    leaf("c", 1, "Result Analysis"),
])


def verdicts(passed, invalid=()):
    out = {}
    for leaf_id in ("a1", "a2", "b1", "b2", "b3", "c"):
        if leaf_id in invalid:
            out[leaf_id] = LeafVerdict(0.0, False, "judge failed", "test")
        else:
            out[leaf_id] = LeafVerdict(1.0 if leaf_id in passed else 0.0, True, "ok", "test")
    return RecordedJudge(out)


def scores(result):
    return {n.id: n.score for n in result.walk()}


CTX = GradingContext(episode_dir="/nonexistent", task="t")


def test_weighted_mean_aggregation_by_hand():
    result = grade(parse_rubric(TREE), verdicts({"a1", "b1", "c"}), CTX)
    s = scores(result)
    assert s["A"] == pytest.approx(1 / 4)
    assert s["B"] == pytest.approx(2 / 4)
    assert s["root"] == pytest.approx((2 * 0.25 + 1 * 0.5 + 1 * 1.0) / 4)  # 0.5
    assert result.valid
    summary = result.summary()
    assert summary["leaves"] == 6 and summary["passed"] == 3 and summary["pass_rate"] == 0.5
    assert summary["per_task_category"]["Code Development"] == {
        "leaves": 3, "graded": 3, "passed": 2, "invalid": 0, "pass_rate": pytest.approx(2 / 3)}
    assert summary["per_finegrained_category"]["Method Implementation"]["passed"] == 1
    json.dumps(result.to_dict())  # JSON-serialisable as it stands


def test_invalid_leaves_score_zero_and_are_counted():
    result = grade(parse_rubric(TREE), verdicts({"a1", "a2", "b1", "b2", "b3", "c"}, invalid={"a2", "c"}),
                   CTX)
    s = scores(result)
    assert s["A"] == pytest.approx(1 / 4) and s["B"] == 1.0
    assert s["root"] == pytest.approx((2 * 0.25 + 1.0 + 0.0) / 4)
    assert not result.valid and result.summary()["invalid"] == 2
    by_id = {n.id: n for n in result.walk()}
    assert not by_id["A"].valid and by_id["B"].valid and "2 invalid" in by_id["root"].explanation


def test_zero_weights_give_zero_and_are_not_judged():
    tree = node("root", 1, [node("Z", 0, [leaf("z1", 1, "Code Development")]),
                            node("Y", 1, [leaf("y1", 0, "Code Development")]),
                            leaf("x", 1, "Code Development")])
    judged = []

    class CountingJudge(RecordedJudge):
        def judge(self, leaf, context):
            judged.append(leaf.id)
            return super().judge(leaf, context)

    judge = CountingJudge({i: LeafVerdict(1.0, True, "ok", "t") for i in ("z1", "y1", "x")})
    result = grade(parse_rubric(tree), judge, CTX)
    s = scores(result)
    assert s["Y"] == 0.0  # children's weights sum to 0
    assert s["root"] == pytest.approx(1 / 2)  # (0*Z + 1*Y(0) + 1*x(1)) / 2
    assert judged == ["x"]
    assert result.summary()["graded"] == 1
    all_judged = grade(parse_rubric(tree), judge, CTX, skip_zero_weight=False)
    assert scores(all_judged)["root"] == pytest.approx(1 / 2) and len(judged) == 4
    # The root's own weight is not relative to anything: 0 there zeroes nothing.
    zero_root = parse_rubric(dict(tree, weight=0))
    assert grade(zero_root, judge, CTX).score == pytest.approx(1 / 2)


def test_result_analysis_scores_zero_when_reproduction_touched_no_files(tmp_path):
    rubric = parse_rubric(TREE)
    all_pass = verdicts({"a1", "a2", "b1", "b2", "b3", "c"})
    assert grade(rubric, all_pass, GradingContext(str(tmp_path))).score == 1.0
    (tmp_path / "f.txt").write_text("x")
    before = snapshot_files(str(tmp_path))
    assert not files_touched(before, snapshot_files(str(tmp_path)))
    result = grade(rubric, all_pass, GradingContext(str(tmp_path), reproduction_touched_files=False))
    s = scores(result)
    assert s["c"] == 0.0 and s["B"] == pytest.approx(3 / 4)
    assert s["root"] == pytest.approx((2 * 1.0 + 0.75 + 0.0) / 4)
    (tmp_path / "g.txt").write_text("y")
    assert files_touched(before, snapshot_files(str(tmp_path)))


def test_code_dev_variant_keeps_only_code_development_leaves():
    rubric = code_dev_variant(parse_rubric(TREE))
    assert [n.id for n in rubric.walk()] == ["root", "A", "a1", "B", "b1", "b3"]
    result = grade(rubric, verdicts({"a1", "b3"}), CTX)
    # A = a1 = 1; B = (2*0 + 1*1)/3; root = (2*1 + 1*(1/3)) / 3
    assert result.score == pytest.approx((2 + 1 / 3) / 3)
    with pytest.raises(RubricError, match="no Code Development leaf"):
        code_dev_variant(parse_rubric(node("r", 1, [leaf("x", 1, "Result Analysis")])))


def test_resources_provided_variant_zeroes_acquisition_leaves():
    rubric = resources_provided_variant(parse_rubric(TREE))
    weights = {n.id: n.weight for n in rubric.walk()}
    assert weights["b1"] == 0 and weights["b3"] == 1 and weights["A"] == 2
    assert parse_rubric(TREE).sub_tasks[1].sub_tasks[0].weight == 2  # the original is unchanged
    result = grade(rubric, verdicts({"b2"}), CTX)
    # B = (0*b1 + 1*b2 + 1*b3) / 2 = 0.5; root = (2*0 + 0.5 + 0) / 4
    assert scores(result)["B"] == pytest.approx(0.5) and result.score == pytest.approx(0.125)


def test_recorded_judge_rescores_a_previous_grading():
    first = grade(parse_rubric(TREE), verdicts({"a1", "b3"}), CTX)
    again = grade(code_dev_variant(parse_rubric(TREE)), RecordedJudge.from_result(first), CTX)
    assert again.score == pytest.approx((2 + 1 / 3) / 3)


def test_load_accepts_paperbench_nulls_and_keeps_extra_fields(tmp_path):
    tree = node("root", 1, [
        {"id": "l1", "requirements": "r", "weight": 1, "sub_tasks": None, "task_category": "Subtree",
         "finegrained_task_category": None, "explanation": "kept"},
        leaf("l2", 2, "Code Development", check="test -f out.txt"),
    ])
    path = tmp_path / "rubric.json"
    path.write_text(json.dumps(tree))
    rubric = load_rubric(path)
    assert [n.id for n in rubric.leaves()] == ["l1", "l2"]
    assert rubric.sub_tasks[0].extra == {"explanation": "kept"}
    assert rubric.sub_tasks[1].check == "test -f out.txt"
    assert parse_rubric(rubric.to_dict()).to_dict() == rubric.to_dict()


@pytest.mark.parametrize("tree, message", [
    (node("r", 1, [leaf("x", 1, None)]), r"node root.sub_tasks\[0\] \(id 'x'\): a leaf needs 'task_category'"),
    (node("r", 1, [leaf("x", -1, "Code Development")]), r"\(id 'x'\): 'weight' must be a non-negative"),
    (node("r", 1, [leaf("x", 1.5, "Code Development")]), r"'weight' must be a non-negative integer, got 1.5"),
    (node("r", 1, [leaf("x", True, "Code Development")]), r"'weight' must be a non-negative integer"),
    (node("r", 1, {"id": "x"}), r"node root \(id 'r'\): 'sub_tasks' must be a list"),
    (node("r", 1, [{"requirements": "no id", "weight": 1}]), r"root.sub_tasks\[0\]: 'id' must be"),
    (node("r", 1, [leaf("x", 1, "Coding")]), r"a leaf needs 'task_category' in"),
    (node("r", 1, [leaf("x", 1, "Code Development")], check="true"), r"'check' is only allowed on leaves"),
    (node("r", 1, [leaf("x", 1, "Code Development", finegrained=3)]), r"'finegrained_task_category'"),
])
def test_validation_errors_name_file_and_node(tmp_path, tree, message):
    path = tmp_path / "bad_rubric.json"
    path.write_text(json.dumps(tree))
    with pytest.raises(RubricError, match=message) as info:
        load_rubric(path)
    assert str(info.value).startswith(f"{path}: node ")


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "rubric.json"
    path.write_text("{not json")
    with pytest.raises(RubricError, match=f"{path}: not valid JSON"):
        load_rubric(path)


# --------------------------------------------------------------------------------------------------
# Repeated ids (official PaperBench files repeat some leaf ids) and unreadable files.

class RequirementJudge:
    """Passes exactly the leaves whose requirement text contains "PASS" (a judge that reads each leaf)."""

    name = "requirement"

    def __init__(self):
        self.seen = []

    def accepts(self, leaf):
        return True

    def judge(self, leaf, context):
        self.seen.append((leaf.id, leaf.key))
        return LeafVerdict(1.0 if "PASS" in leaf.requirements else 0.0, True, "read", self.name)


def official_shape_with_repeats():
    """Official shape: uuid ids, internal task_category null, no finegrained category; the leaf id
    "gt-acc" appears under two parents with different requirements and weights, and the internal id
    "setup" twice."""
    def leaf_(id_, weight, requirements, category="Result Analysis"):
        return {"id": id_, "requirements": requirements, "weight": weight, "sub_tasks": [],
                "task_category": category}
    return node("4f1c9a0e-0d6c-4a55-9b5e-2d7d3c2e9a11", 1, [
        node("setup", 1, [leaf_("gt-acc", 3, "GSM8K accuracy is reported. PASS"),
                          leaf_("3c9e5b0a-71a2-4b7e-8f0f-1c2d3e4f5a6b", 1, "Code is written",
                                "Code Development")]),
        node("setup", 2, [leaf_("gt-acc", 1, "TruthfulQA accuracy is reported"),
                          leaf_("a8d0e7c4-5b6a-4c3d-9e2f-0a1b2c3d4e5f", 1, "Code runs. PASS", "Code Execution")]),
    ])


def test_repeated_ids_load_and_every_leaf_gets_its_own_verdict_and_weight(tmp_path):
    path = tmp_path / "rubric.json"
    path.write_text(json.dumps(official_shape_with_repeats()))
    rubric = load_rubric(path)
    assert [n.id for n in rubric.leaves()].count("gt-acc") == 2
    assert [n.key for n in rubric.walk()] == ["/", "/0", "/0/0", "/0/1", "/1", "/1/0", "/1/1"]
    assert duplicate_ids(rubric) == {"setup": ["/0", "/1"], "gt-acc": ["/0/0", "/1/0"]}
    judge = RequirementJudge()
    result = grade(rubric, judge, CTX)
    assert sorted(judge.seen) == sorted((n.id, n.key) for n in rubric.leaves())  # each leaf judged once
    leaves = {n.key: n for n in result.leaves()}
    assert leaves["/0/0"].id == leaves["/1/0"].id == "gt-acc"
    assert leaves["/0/0"].score == 1.0 and leaves["/1/0"].score == 0.0
    assert leaves["/0/0"].duplicate_id and not leaves["/0/1"].duplicate_id
    # first setup = (3*1 + 1*0) / 4; second setup = (1*0 + 1*1) / 2; root = (1*0.75 + 2*0.5) / 3
    assert result.score == pytest.approx((0.75 + 2 * 0.5) / 3)
    summary = result.summary()
    assert summary["duplicate_ids"] == ["gt-acc", "setup"] and summary["leaves"] == 4
    assert summary["passed"] == 2
    out = result.to_dict()
    second = out["children"][1]["children"][0]
    assert (second["id"], second["key"], second["duplicate_id"], second["score"]) == ("gt-acc", "/1/0", True, 0.0)
    json.dumps(out)


def test_recorded_verdicts_of_repeated_ids_survive_a_variant():
    rubric = parse_rubric(official_shape_with_repeats())
    first = grade(rubric, RequirementJudge(), CTX)
    again = grade(rubric, RecordedJudge.from_result(first), CTX)
    assert [n.score for n in again.leaves()] == [n.score for n in first.leaves()] == [1.0, 0.0, 0.0, 1.0]
    assert again.score == pytest.approx(first.score)
    # The Result Analysis leaves (both "gt-acc") pruned: the kept leaves keep their keys and verdicts.
    variant = code_dev_variant(rubric)
    assert [n.key for n in variant.leaves()] == ["/0/1"]
    assert grade(variant, RecordedJudge.from_result(first), CTX).score == 0.0


def test_hand_built_trees_get_position_keys():
    from klong_jax.rubric import RubricNode
    leaf_a = RubricNode("x", "a PASS", 1, task_category="Code Development")
    leaf_b = RubricNode("x", "b", 1, task_category="Code Development")
    tree = RubricNode("r", "root", 1, [leaf_a, leaf_b])
    result = grade(tree, RequirementJudge(), CTX)
    assert [(n.key, n.score) for n in result.leaves()] == [("/0", 1.0), ("/1", 0.0)]
    assert result.score == 0.5
    spliced = RubricNode("r", "root", 1, [parse_rubric(leaf("p", 1, "Code Development")),
                                          parse_rubric(leaf("q", 1, "Code Development"))])
    with pytest.raises(RubricError, match="share the key '/'"):
        grade(spliced, RequirementJudge(), CTX)


def test_missing_rubric_file_names_it(tmp_path):
    path = tmp_path / "paper" / "rubric.json"
    with pytest.raises(RubricError, match=f"^{path}: no such file"):
        load_rubric(path)


def test_directory_instead_of_rubric_file_names_it(tmp_path):
    path = tmp_path / "rubric.json"
    path.mkdir()
    with pytest.raises(RubricError, match=f"^{path}: is a directory, not a rubric file"):
        load_rubric(path)


def test_non_utf8_rubric_names_the_file_and_the_byte(tmp_path):
    path = tmp_path / "rubric.json"
    path.write_bytes(json.dumps(TREE, indent=1).encode().replace(b"requirement a1", b"requirement \xe9a1"))
    with pytest.raises(RubricError, match=rf"^{path}: the rubric file is not UTF-8 text: byte 0xe9 at offset "
                                          r"\d+ \(line \d+\) is invalid \(re-save the file as UTF-8\)"):
        load_rubric(path)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(TREE).encode())  # a UTF-8 byte-order mark is UTF-8
    assert load_rubric(path).id == "root"


def test_git_lfs_pointer_instead_of_rubric_names_it(tmp_path):
    path = tmp_path / "rubric.json"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4a5a\nsize 101711\n")
    with pytest.raises(RubricError, match=f"^{path}: is a Git LFS pointer"):
        load_rubric(path)


def test_unreadable_rubric_file_names_it(tmp_path):
    path = tmp_path / "rubric.json"
    path.write_text(json.dumps(TREE))
    path.chmod(0o000)
    if os.geteuid() != 0:
        with pytest.raises(RubricError, match=f"^{path}: cannot read the rubric file: permission denied"):
            load_rubric(path)
        return
    # Root reads any file: load it from a child that has switched to an unprivileged uid.
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() of a threaded process: the child only reads
        pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            try:
                load_rubric(path)
                message = "loaded"
            except RubricError as e:
                message = str(e)
            os.write(write_end, message.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    assert message.startswith(f"{path}: cannot read the rubric file: permission denied"), message
