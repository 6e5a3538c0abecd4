"""Rubric loading, validation, variants and score aggregation (hand-computed scores)."""
import json

import pytest

from klong_jax.rubric import (GradingContext, LeafVerdict, RecordedJudge, RubricError, code_dev_variant,
                              files_touched, grade, load_rubric, parse_rubric, resources_provided_variant,
                              snapshot_files)


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
    (node("r", 1, [leaf("x", 1, "Code Development"), node("m", 1, [leaf("x", 1, "Code Execution")])]),
     r"node root.sub_tasks\[1\].sub_tasks\[0\] \(id 'x'\): duplicate id 'x' \(first at root.sub_tasks\[0\]\)"),
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
