"""Trajectory format: dataclasses, and a validator that names file, line and field of every problem."""
import json

import numpy as np
import pytest

from klong_jax.data import trajectory as tj
from klong_jax.data.synthetic import synthetic_trajectory


def _good(**overrides):
    rec = {"id": "e1", "task_id": "t1", "messages": [
        {"role": "system", "content": "You are an agent."},
        {"role": "user", "content": "Reproduce the paper."},
        {"role": "assistant", "content": "", "reasoning": "look first",
         "tool_calls": [{"id": "c1", "name": "bash", "arguments": {"cmd": "ls", "timeout": 30}}]},
        {"role": "tool", "content": "a.py", "tool_call_id": "c1"},
        {"role": "assistant", "content": "done",
         "tool_calls": [{"id": "c2", "name": "submit", "arguments": {"end_message": "ok"}}]},
        {"role": "tool", "content": "submitted", "tool_call_id": "c2"},
    ], "meta": {"model": "expert"}, "reward": 0.5}
    rec.update(overrides)
    return rec


def _issues(rec):
    return [(i.field, i.message) for i in tj.validate_trajectory(rec)]


def test_valid_record_parses_and_round_trips():
    t = tj.parse_trajectory(_good())
    assert t.messages[2].tool_calls[0] == tj.ToolCall("c1", "bash", {"cmd": "ls", "timeout": 30})
    assert t.messages[3].tool_call_id == "c1" and t.reward == 0.5
    assert tj.parse_trajectory(json.loads(t.to_json())) == t


def test_synthetic_trajectories_are_valid():
    rng = np.random.default_rng(0)
    for i in range(20):
        t = synthetic_trajectory(rng, traj_id=f"x{i}", n_turns=int(rng.integers(1, 10)))
        assert tj.validate_trajectory(t.to_dict()) == []


def test_null_assistant_content_is_empty_text():
    rec = _good()
    rec["messages"][2]["content"] = None
    assert tj.parse_trajectory(rec).messages[2].content == ""


@pytest.mark.parametrize("mutate, field, fragment", [
    (lambda r: r["messages"][1].update(role="narrator"), "messages[1].role", "unknown role"),
    (lambda r: r["messages"][3].update(tool_call_id="zz"), "messages[3].tool_call_id",
     "tool result without its call"),
    (lambda r: r["messages"].append({"role": "assistant", "content": "more"}), "messages[6]",
     "assistant turn after the end"),
    (lambda r: r.update(messages=[]), "messages", "empty trajectory"),
    (lambda r: r["messages"][1].update(content=3), "messages[1].content", "expected a string, got int"),
    (lambda r: r.update(reward="high"), "reward", "finite number"),
    (lambda r: r.update(id=7), "id", "expected a string"),
    (lambda r: r.pop("task_id"), "task_id", "missing"),
    (lambda r: r.update(extra=1), "extra", "unknown field"),
    (lambda r: r["messages"][2]["tool_calls"][0].update(arguments="ls"),
     "messages[2].tool_calls[0].arguments", "expected an object, got str"),
    (lambda r: r["messages"][4]["tool_calls"][0].update(id="c1"), "messages[4].tool_calls[0].id",
     "duplicate tool call id"),
    (lambda r: r["messages"][1].update(reasoning="hm"), "messages[1].reasoning",
     "only assistant messages have reasoning"),
    (lambda r: r["messages"].pop(3), "messages[2].tool_calls[0]", "has no result"),
    (lambda r: r["messages"][3].pop("tool_call_id"), "messages[3].tool_call_id", "missing"),
    (lambda r: r["messages"][1].update(content="bad \ud800 text"), "messages[1].content",
     "lone surrogate"),
    (lambda r: r.update(messages=[{"role": "user", "content": "hi"}]), "messages",
     "no assistant message"),
    (lambda r: r.update(messages=r["messages"][2:]), "messages", "no user message"),
])
def test_each_problem_is_named(mutate, field, fragment):
    rec = _good()
    mutate(rec)
    issues = _issues(rec)
    assert any(f == field and fragment in m for f, m in issues), issues


def test_all_problems_reported_at_once():
    rec = _good(id=1, reward="x")
    rec["messages"][1]["role"] = "bot"
    fields = {f for f, _ in _issues(rec)}
    assert {"id", "reward", "messages[1].role"} <= fields


def test_final_assistant_may_leave_calls_open():
    rec = _good()
    rec["messages"] = rec["messages"][:3]    # timed out after the call
    assert _issues(rec) == []


def _write(tmp_path, lines: list[bytes]):
    path = tmp_path / "traj.jsonl"
    path.write_bytes(b"".join(lines))
    return str(path)


def _bad_file(tmp_path):
    good = json.dumps(_good()).encode() + b"\n"
    truncated = json.dumps(_good(id="e2")).encode()[:-40] + b"\n"
    wrong_type = json.dumps(_good(id="e3", messages="nope")).encode() + b"\n"
    orphan = _good(id="e4")
    orphan["messages"][3]["tool_call_id"] = "ghost"
    bad_utf8 = b'{"id": "e5", "task_id": "t", "messages": [{"role": "user", "content": "\xff"}]}\n'
    return _write(tmp_path, [good, b"\n", truncated, wrong_type,
                             json.dumps(orphan).encode() + b"\n", bad_utf8, good])


def test_malformed_file_reports_line_and_field(tmp_path):
    path = _bad_file(tmp_path)
    issues = tj.validate_file(path)
    by_line = {}
    for i in issues:
        assert i.source == path
        by_line.setdefault(i.line, []).append(i)
    assert sorted(by_line) == [3, 4, 5, 6]
    assert "truncated" in by_line[3][0].message
    assert by_line[4][0].field == "messages" and "expected a list" in by_line[4][0].message
    assert by_line[5][0].field == "messages[3].tool_call_id"
    assert "without its call" in by_line[5][0].message
    assert "invalid UTF-8" in by_line[6][0].message
    assert str(by_line[5][0]).startswith(f"{path}:5: messages[3].tool_call_id:")


def test_read_jsonl_raise_and_skip(tmp_path, caplog):
    path = _bad_file(tmp_path)
    with pytest.raises(tj.TrajectoryError, match=r"traj\.jsonl:3: .*truncated"):
        list(tj.read_jsonl(path))
    stats = tj.SkipStats()
    with caplog.at_level("WARNING"):
        kept = list(tj.read_jsonl(path, on_error="skip", stats=stats))
    assert [t.id for t in kept] == ["e1", "e1"]
    assert stats.skipped == 4 and sum(stats.by_reason.values()) == 4
    assert sum("skipping" in r.getMessage() for r in caplog.records) == 4
    with pytest.raises(ValueError, match="on_error"):
        list(tj.read_jsonl(path, on_error="ignore"))


def test_cli_validator(tmp_path, capsys):
    assert tj.main(["validate", _bad_file(tmp_path)]) == 1
    assert "5 problem(s)" in capsys.readouterr().out  # line 5 has two
    good = _write(tmp_path, [json.dumps(_good()).encode() + b"\n"])
    assert tj.main(["validate", good]) == 0


def test_split_turns():
    t = tj.parse_trajectory(_good())
    prefix, turns = tj.split_turns(t.messages)
    assert [m.role for m in prefix] == ["system", "user"]
    assert [(tr.first_message, len(tr.observations)) for tr in turns] == [(2, 1), (4, 1)]
