"""Teacher rollouts with rejection sampling: the agent driven by a chat endpoint (a scripted one, a real HTTP
server: tests/factory_endpoints.py) works embedded tasks in real sandboxes; the rubric grades; episodes at or
above the threshold are kept as trajectory JSONL, which loads through the data pipeline and trains one SFT
step (launch/train.py, configs/sft.py:tiny, data.train_paths)."""
import json
import os
import subprocess
import sys

import pytest

from factory_endpoints import (ScriptedEndpoint, chat_answer, expert_answer, expert_script, http_error, task_of,
                               turn_of)
from klong_jax.agent import AgentConfig, ChatPolicy, run_episodes, tool_schemas
from klong_jax.agent.chat_policy import TOOL_CALL_FORMAT, openai_messages
from klong_jax.data.chat_template import Glm45Template
from klong_jax.data.context import ContextConfig, ContextPolicy
from klong_jax.data.splitting import split
from klong_jax.data.template_base import TOOL_CALL_FORMAT_SLOT
from klong_jax.data.tokenizer import SentencePieceTokenizer
from klong_jax.data.train_tokenizer import train_sentencepiece, trajectory_texts
from klong_jax.data.trajectory import Message, ToolCall, parse_trajectory, read_jsonl
from klong_jax.factory.endpoint import ChatEndpoint
from klong_jax.factory.teacher import run_teacher
from klong_jax.sandbox import SandboxPool
from klong_jax.tasks import generate_task, solve_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """Two short embedded tasks and a GLM-4.5 template over a SentencePiece tokenizer trained on their
    expert trajectories (the tiny model's tokenizer for the SFT step)."""
    d = tmp_path_factory.mktemp("teacher_suite")
    tasks = [generate_task(i, seed=11, difficulty=1, length=6) for i in range(2)]
    experts = [solve_task(t, d / f"expert{i}", mistake_prob=0.0, seed=0) for i, t in enumerate(tasks)]
    assert all(e["reward"] == 1.0 for e in experts)
    sp = train_sentencepiece(list(trajectory_texts(parse_trajectory(e) for e in experts)), str(d / "sp.model"),
                             vocab_size=500)
    return {"tasks": tasks, "template": Glm45Template(SentencePieceTokenizer(sp)), "sp": sp, "dir": d}


def agent_config(**kw) -> AgentConfig:
    context = ContextConfig(budget_tokens=4096, reserve_tokens=256, max_tool_result_tokens=200)
    return AgentConfig(context=context, **{"timeout_s": 120.0, "max_turns": 40, **kw})


def endpoint_for(server, **kw) -> ChatEndpoint:
    return ChatEndpoint(server.url, "teacher", **{"timeout_s": 10.0, "max_attempts": 2, "backoff_s": 0.01, **kw})


@pytest.fixture(scope="module")
def expert_run(suite, tmp_path_factory):
    """The scripted teacher plays each task's expert plan: every episode scores 1.0 and is kept."""
    d = tmp_path_factory.mktemp("expert_run")
    with ScriptedEndpoint(expert_script(suite["tasks"])) as server:
        endpoint = endpoint_for(server)
        report = run_teacher(suite["tasks"], endpoint, template=suite["template"], config=agent_config(),
                             pool=SandboxPool(2), workdir=str(d / "work"), out_path=str(d / "kept.jsonl"),
                             n_per_task=1, threshold=0.9)
    return report, server, endpoint


def test_expert_teacher_episodes_score_one_and_are_kept(suite, expert_run):
    report, server, endpoint = expert_run
    tasks = suite["tasks"]
    plans = [t.expert_plan() for t in tasks]
    assert (report.episodes, report.kept, report.dropped, report.failed) == (2, 2, 0, 0)
    assert report.scores == {f"teacher-{t.task_id}-g0": 1.0 for t in tasks}
    assert report.finish_reasons == {"submit": 2}
    # One endpoint call per turn, each turn one planned call: requests = turns = sum of the plans' lengths,
    # and the scripted usage is 100 prompt + 10 completion tokens per answer.
    n_turns = sum(len(p) for p in plans)
    assert report.turns == n_turns == report.endpoint["requests"] == report.endpoint["calls"]
    assert (report.endpoint["prompt_tokens"], report.endpoint["completion_tokens"]) == (100 * n_turns, 10 * n_turns)
    assert report.endpoint["failures"] == report.endpoint["retries"] == 0

    kept = list(read_jsonl(report.out_path))
    assert [t.id for t in kept] == report.kept_ids == [f"teacher-{t.task_id}-g0" for t in tasks]
    for trajectory, task, plan in zip(kept, tasks, plans):
        assert trajectory.reward == 1.0 and trajectory.task_id == task.task_id
        assert trajectory.meta["source"] == "teacher" and trajectory.meta["teacher"] == {"model": "teacher",
                                                                                        "threshold": 0.9}
        # Every turn rendered canonically in the template: the tokens are the template's own encoding, so
        # the splitter replays exactly the windows the episode had.
        assert trajectory.meta["exact_replay"] is True
        calls = [(c.name, c.arguments, m.reasoning) for m in trajectory.messages if m.role == "assistant"
                 for c in m.tool_calls]
        assert calls == [(a.tool, a.arguments, a.reasoning) for a in plan]
        assert trajectory.messages[1].content == task.spec
        assert "{tool_call_format}" in trajectory.messages[0].content   # data stay template-free
        windows = split(trajectory, ContextPolicy(suite["template"], agent_config().context))
        assert sum(len(w.generated_turns) for w in windows) == len(plan)


def test_the_endpoint_sees_the_context_as_chat_messages_with_the_tools(suite, expert_run):
    _, server, _ = expert_run
    first, later = server.requests[0], next(r for r in server.requests if turn_of(r) == 3)
    assert first["model"] == "teacher" and first["tools"] == tool_schemas()
    assert [m["role"] for m in first["messages"]] == ["system", "user"]
    system = first["messages"][0]["content"]
    assert TOOL_CALL_FORMAT in system and TOOL_CALL_FORMAT_SLOT not in system
    # Turn 3's request: prefix + turns 0..2, each an assistant call answered by its tool result.
    roles = [m["role"] for m in later["messages"]]
    assert roles[:2] == ["system", "user"] and turn_of(later) == 3
    calls = [m for m in later["messages"] if m["role"] == "assistant"]
    results = [m for m in later["messages"] if m["role"] == "tool"]
    assert len(calls) == len(results) == 3
    assert [c["tool_calls"][0]["id"] for c in calls] == [r["tool_call_id"] for r in results] == \
        ["call_0000_0", "call_0001_0", "call_0002_0"]
    task = task_of(later, suite["tasks"])
    assert [json.loads(c["tool_calls"][0]["function"]["arguments"]) for c in calls] == \
        [a.arguments for a in task.expert_plan()[:3]]
    assert "reasoning_content" not in calls[0]   # not sent back unless asked (send_reasoning)


def test_bad_answers_are_dropped_and_a_failing_endpoint_is_counted(suite, tmp_path):
    good, bad = suite["tasks"]
    garbage_sent = set()

    def script(body, n):
        task, turn = task_of(body, suite["tasks"]), turn_of(body)
        if task is good:   # the endpoint fails on every request of this task
            return http_error(500)
        if turn == 0 and "turn0" not in garbage_sent:   # garbage arguments: rejected, retried
            garbage_sent.add("turn0")
            return chat_answer("", tool_calls=[("bash", '{"cmd": "ls')])
        if turn == 0:
            return chat_answer("Look around.", tool_calls=[("bash", {"cmd": "ls"})])
        return chat_answer("", tool_calls=[("submit", {"end_message": "done"})])

    with ScriptedEndpoint(script) as server:
        endpoint = endpoint_for(server)
        report = run_teacher([good, bad], endpoint, template=suite["template"], config=agent_config(),
                             pool=SandboxPool(2), workdir=str(tmp_path / "work"), out_path=str(tmp_path / "k.jsonl"),
                             threshold=0.5)
    good_id, bad_id = f"teacher-{good.task_id}-g0", f"teacher-{bad.task_id}-g0"
    assert (report.episodes, report.kept, report.dropped, report.failed) == (2, 0, 1, 1)
    assert report.scores[bad_id] < 0.5                # listed files and submitted: nothing of the spec done
    [failure] = report.failures
    assert failure["episode_id"] == good_id and failure["finish_reason"] == "error"
    assert "turn 0" in failure["error"] and "HTTP 500" in failure["error"] and server.url in failure["error"]
    assert report.finish_reasons == {"error": 1, "submit": 1}
    # Requests: the failing task 2 (max_attempts) + the bad task's turn 0 twice (garbage, then ls) + submit = 5.
    stats = report.endpoint
    assert (stats["requests"], stats["calls"], stats["failures"], stats["invalid"], stats["retries"]) == (5, 3, 1, 1, 2)
    assert os.path.getsize(report.out_path) == 0 and report.kept_ids == []


def test_an_endpoint_failure_ends_only_its_episode(suite, tmp_path):
    """Two episodes share each batched step; the endpoint fails task b's second turn: that episode ends as an
    error after one turn (graded as it stands), while task a's runs to its submit."""
    a, b = suite["tasks"]

    def script(body, n):
        task, turn = task_of(body, suite["tasks"]), turn_of(body)
        return http_error(503) if task is b and turn == 1 else expert_answer(task, turn)

    with ScriptedEndpoint(script) as server:
        policy = ChatPolicy(endpoint_for(server), suite["template"], max_workers=2)
        results = run_episodes([a, b], policy, n_per_task=1, template=suite["template"], config=agent_config(),
                               pool=SandboxPool(2), workdir=str(tmp_path))
    n_a = len(a.expert_plan())
    assert [r.finish_reason for r in results] == ["submit", "error"]
    assert [len(r.turns) for r in results] == [n_a, 1]
    assert "turn 1" in results[1].error and "HTTP 503" in results[1].error and "after 2 attempt(s)" in results[1].error
    assert results[0].reward == 1.0 and results[1].grade_valid and results[1].reward < 1.0
    # Turns produced: all of a's and b's first; one failed turn, recorded with its episode and turn.
    assert policy.counts == {"turns": n_a + 1, "failed_turns": 1}
    assert policy.errors[0][:2] == (results[1].episode_id, 1)
    assert parse_trajectory(results[1].trajectory().to_dict()).messages[-1].role == "tool"   # a valid record


def test_openai_messages_convert_the_agent_conversation():
    messages = [Message("system", f"Be exact.\n{TOOL_CALL_FORMAT_SLOT}"), Message("user", "task"),
                Message("assistant", "ok", "why", (ToolCall("c1", "bash", {"cmd": "ls"}),)),
                Message("tool", "a.txt", tool_call_id="c1")]
    out = openai_messages(messages, tool_call_format="CALL FUNCTIONS", send_reasoning=True)
    assert out == [{"role": "system", "content": "Be exact.\nCALL FUNCTIONS"}, {"role": "user", "content": "task"},
                   {"role": "assistant", "content": "ok", "reasoning_content": "why",
                    "tool_calls": [{"id": "c1", "type": "function",
                                    "function": {"name": "bash", "arguments": '{"cmd": "ls"}'}}]},
                   {"role": "tool", "content": "a.txt", "tool_call_id": "c1"}]
    schemas = {s["function"]["name"]: s["function"]["parameters"] for s in tool_schemas()}
    assert schemas["read_file_chunk"]["required"] == ["file"]
    assert schemas["read_file_chunk"]["properties"]["start_line"] == {"type": "integer", "description": "from 1"}
    assert schemas["submit"]["required"] == [] and schemas["write_file"]["required"] == ["path", "content"]


@pytest.mark.slow   # the default run trains on kept trajectories end to end in test_factory_launch.py
def test_kept_trajectories_train_one_sft_step(suite, expert_run, tmp_path):
    report, _, _ = expert_run
    workdir = tmp_path / "sft"
    values = {
        "cpu_devices": 2, "model.num_hidden_layers": 2, "model.vocab_size": 512, "model.hidden_size": 64,
        "model.n_routed_experts": 4, "train.seq_len": 1024, "train.global_batch": 2, "train.steps": 1,
        "train.log_every": 1, "train.eval_every": 1, "train.eval_batches": 1, "checkpoint.every": 1,
        "checkpoint.async_save": False, "data.train_paths": report.out_path, "data.tokenizer": suite["sp"],
        "data.pipeline.context.budget_tokens": 1024, "data.pipeline.context.reserve_tokens": 128,
        "data.pipeline.context.max_tool_result_tokens": 200, "data.pipeline.pack_chunk": 2,
    }
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=configs/sft.py:tiny",
           f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in values.items()]]
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1] and train[0]["nonfinite"] == 0.0
    # A fresh model over a 500-id vocabulary: the loss is near ln(512) = 6.24, finite and positive.
    assert 3.0 < train[0]["loss"] < 9.0
    assert os.path.isdir(workdir / "checkpoints" / "1")
