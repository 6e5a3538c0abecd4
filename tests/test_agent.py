"""The agent loop, end to end with real sandboxes, tools, the ContextPolicy and rubric grading: the
scripted policy replays expert trajectories (rendered by the chat template, parsed back by the agent)
and must reproduce the experts' scores; recorded windows equal the splitter's; budgets end episodes;
malformed output becomes error observations; many episodes share batched generate calls. The suite runs with
the GLM-4.5 template (SentencePiece) and with ChatML (a byte-level BPE tokenizer.json with ChatML's tokens)."""
import dataclasses

import numpy as np
import pytest

from klong_jax.agent import (ARG_TYPES, AgentConfig, ScriptedPolicy, evaluate, parse_turn, rollout_windows,
                             run_episodes)
from klong_jax.data.chat_template import ChatMLTemplate, ChatTemplate, Glm45Template
from klong_jax.data.context import ContextConfig, ContextPolicy
from klong_jax.data.splitting import split
from klong_jax.data.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer
from klong_jax.data.train_tokenizer import train_hf_tokenizer_json, train_sentencepiece, trajectory_texts
from klong_jax.data.trajectory import Message, ToolCall, parse_trajectory, split_turns, validate_trajectory
from klong_jax.sandbox import SandboxPool
from klong_jax.tasks import generate_task, solve_task


@dataclasses.dataclass
class Suite:
    tasks: list
    experts: list          # one graded expert trajectory (dict) per task, each submitted
    half: dict             # a half-done expert trajectory of tasks[0] (no submit, partial credit)
    template: ChatTemplate


def make_suite(directory, kind: str = "glm45") -> Suite:
    """Two embedded tasks, their expert trajectories (with mistakes) and a tokenizer trained on them; kind:
    "glm45" (SentencePiece with GLM's tokens) or "chatml" (tokenizer.json with ChatML's tokens)."""
    tasks = [generate_task(i, seed=5, difficulty=2, length=10) for i in range(2)]
    experts = [solve_task(t, directory / f"expert{i}", mistake_prob=0.3, seed=1)
               for i, t in enumerate(tasks)]
    n_actions = len(tasks[0].expert_plan()) // 2
    half = solve_task(tasks[0], directory / "half", mistake_prob=0.0, max_actions=n_actions)
    texts = list(trajectory_texts(parse_trajectory(t) for t in experts + [half]))
    if kind == "chatml":
        path = train_hf_tokenizer_json(texts, str(directory / "chatml.json"), vocab_size=500,
                                       special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
        return Suite(tasks, experts, half, ChatMLTemplate(HuggingFaceTokenizer(path)))
    sp = train_sentencepiece(texts, str(directory / "sp.model"), vocab_size=500)
    return Suite(tasks, experts, half, Glm45Template(SentencePieceTokenizer(sp)))


@pytest.fixture(scope="module", params=["glm45", "chatml"])
def suite(request, tmp_path_factory):
    return make_suite(tmp_path_factory.mktemp("suite"), request.param)


def agent_config(budget=4096, **kw) -> AgentConfig:
    context = ContextConfig(budget_tokens=budget, reserve_tokens=kw.pop("reserve", 200),
                            max_tool_result_tokens=kw.pop("max_tool_result_tokens", 120))
    return AgentConfig(context=context, **{"timeout_s": 60.0, "max_turns": 200, **kw})


def tool_results(messages):
    return [m.content if isinstance(m, Message) else m["content"] for m in messages
            if (m.role if isinstance(m, Message) else m["role"]) == "tool"]


def assistant_turns(trajectory: dict):
    return [t.assistant for t in split_turns(parse_trajectory(trajectory).messages)[1]]


# ----------------------------------------------------------------------------------------------
# Parsing


def test_parse_turn_round_trips_every_tool(suite):
    t = suite.template
    calls = [("bash", {"cmd": "ls -la | grep 'x y'"}), ("python", {"code": "print(1)\nprint(2)\n"}),
             ("read_file_chunk", {"file": "a.txt", "start_line": 3, "max_lines": 20}),
             ("write_file", {"path": "n.txt", "content": "42"}),   # a string that reads as JSON
             ("search_file", {"file": "a.txt", "query": "7", "context_lines": 0, "max_matches": 2,
                              "page": 1}),
             ("submit", {"end_message": "done"})]
    for k, (name, args) in enumerate(calls):
        message = Message("assistant", "content\nline", f"why {k}", (ToolCall("x", name, args),))
        ids = t.completion_ids(message)
        turn = parse_turn(t, ids, turn=7)
        got = turn.parsed.message
        assert not turn.parsed.errors and turn.canonical and turn.n_forced == 0
        assert (got.content, got.reasoning) == (message.content, message.reasoning)
        assert [(c.name, c.arguments) for c in got.tool_calls] == [(name, args)]
        assert got.tool_calls[0].id == "call_0007_0"
        assert set(args) <= set(ARG_TYPES[name])
    # Cut off mid-call: the complete part parses, the end-of-turn token is appended, not sampled.
    message = Message("assistant", "", "r", (ToolCall("x", "bash", {"cmd": "echo hi"}),))
    ids = t.completion_ids(message)
    turn = parse_turn(t, ids[:-4], turn=0)
    assert not turn.parsed.finished and turn.n_forced == 1 and not turn.canonical
    assert turn.action_ids[:-1] == ids[:-4] and turn.action_ids[-1] in t.stop_ids
    assert any("unclosed" in e for e in turn.parsed.errors)


def _after_each_assistant_turn(messages) -> dict[int, list]:
    """turn k -> the messages (tool results, feedback) between assistant turn k and the next."""
    feedback, j = {}, None
    for m in messages:
        if m.role == "assistant":
            j = len(feedback)
            feedback[j] = []
        elif j is not None:
            feedback[j].append(m)
    return feedback


def test_malformed_output_becomes_error_observations(suite, tmp_path):
    if suite.template.name != "glm45":
        pytest.skip("GLM-4.5 output; ChatML's: test_malformed_chatml_output_becomes_error_observations")
    task, t = suite.tasks[0], suite.template
    script = [
        # The end of turn arrives inside the call: unclosed.
        "<think>list</think>\n<tool_call>bash\n<arg_key>cmd</arg_key>\n<arg_value>ls<|observation|>",
        "<think>x</think>\n<tool_call>nosuchtool\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n"
        "</tool_call><|observation|>",
        "<think>read</think>\n<tool_call>read_file_chunk\n<arg_key>file</arg_key>\n<arg_value>x.txt"
        "</arg_value>\n<arg_key>start_line</arg_key>\n<arg_value>abc</arg_value>\n</tool_call>"
        "<|observation|>",
        "I am done thinking.<|user|>",
        "<think>stray</think></think><|user|>",
        Message("assistant", "", "Stop here.", (ToolCall("c", "submit", {"end_message": "bye"}),)),
    ]
    policy = ScriptedPolicy(suite.template, {task.task_id: script})
    [r] = run_episodes([task], policy, n_per_task=1, template=suite.template,
                       config=agent_config(), pool=SandboxPool(1), workdir=str(tmp_path))
    assert r.finish_reason == "submit" and len(r.turns) == 6
    assert r.reward == 0.0 and r.grade_valid
    feedback = _after_each_assistant_turn(r.messages)
    first = [m.content for m in feedback[0]]
    assert len(first) == 1 and "malformed" in first[0] and "unclosed tool call" in first[0]
    assert "did not call a tool" in first[0]
    assert feedback[1][0].role == "tool" and "unknown tool 'nosuchtool'" in feedback[1][0].content
    assert "start_line must be an integer" in feedback[2][0].content
    assert "expected a JSON integer" in feedback[2][1].content
    # A turn with no call: the nudge, and the template's call syntax after it.
    assert [m.content for m in feedback[3]] == [agent_config().nudge_message + "\n" + t.format_hint]
    assert "malformed" in feedback[4][0].content and "unexpected token" in feedback[4][0].content
    # Every scripted turn ended with an end-of-turn token: nothing was cut off.
    assert all(t.finish == "stop" for t in r.turns)
    assert not any("cut off" in m.content for m in r.messages if m.role == "user")
    # Turn 0 ended with <|observation|> but called no tool: <|user|> is appended (not sampled), so
    # the feedback that follows is a well-formed user message.
    ids = suite.template.ids
    assert [t.n_forced for t in r.turns] == [1, 0, 0, 0, 0, 0]
    first = r.context.turns[0]
    assert first.ids[first.action_len - 2:first.action_len].tolist() == \
        [ids["<|observation|>"], ids["<|user|>"]]
    assert first.ids[first.action_len - 1] != r.turns[0].sampled_ids[-1]
    assert len(r.turns[0].sampled_ids) == first.action_len - 2
    assert r.turns[0].parse_errors and not r.turns[0].canonical
    assert validate_trajectory(r.trajectory().to_dict()) == []


def test_malformed_chatml_output_becomes_error_observations(suite, tmp_path):
    if suite.template.name != "chatml":
        pytest.skip("ChatML output; GLM-4.5's: test_malformed_output_becomes_error_observations")
    task, t = suite.tasks[0], suite.template
    script = [
        # The end of turn arrives inside the call: unclosed, and no call ran.
        '<think>list</think>\n<tool_call>{"name": "bash", "arguments": {"cmd": "ls"}<|im_end|>',
        '<tool_call>{"name": "nosuchtool", "arguments": {"a": 1}}</tool_call><|im_end|>',
        '<think>read</think>\n<tool_call>{"name": "read_file_chunk", "arguments": {"file": "x.txt", '
        '"start_line": "abc"}}</tool_call><|im_end|>',
        "I am done thinking.<|im_end|>",
        "<think>x</think>\nNo call.<|endoftext|>",      # another stop token: <|im_end|> is appended
        Message("assistant", "", "Stop here.", (ToolCall("c", "submit", {"end_message": "bye"}),)),
    ]
    policy = ScriptedPolicy(t, {task.task_id: script})
    [r] = run_episodes([task], policy, n_per_task=1, template=t, config=agent_config(), pool=SandboxPool(1),
                       workdir=str(tmp_path))
    assert r.finish_reason == "submit" and len(r.turns) == 6
    assert r.reward == 0.0 and r.grade_valid
    feedback = _after_each_assistant_turn(r.messages)
    first = [m.content for m in feedback[0]]
    assert len(first) == 1 and "malformed" in first[0] and "unclosed tool call" in first[0]
    assert "did not call a tool" in first[0] and t.format_hint in first[0]
    assert feedback[1][0].role == "tool" and "unknown tool 'nosuchtool'" in feedback[1][0].content
    assert "start_line must be an integer" in feedback[2][0].content
    assert "expected a JSON integer" in feedback[2][1].content
    # A turn with no call: the nudge, and the template's call syntax after it.
    assert [m.content for m in feedback[3]] == [agent_config().nudge_message + "\n" + t.format_hint]
    assert [m.content for m in feedback[4]] == [agent_config().nudge_message + "\n" + t.format_hint]
    assert all(t.finish == "stop" for t in r.turns)
    # Turn 4 stopped at <|endoftext|>: <|im_end|> is appended (not sampled) and the next message opens with
    # "\n<|im_start|>user\n" after it.
    assert [turn.n_forced for turn in r.turns] == [0, 0, 0, 0, 1, 0]
    fifth = r.context.turns[4]
    assert fifth.ids[fifth.action_len - 2:fifth.action_len].tolist() == \
        [t.ids["<|endoftext|>"], t.ids["<|im_end|>"]]
    assert len(r.turns[4].sampled_ids) == fifth.action_len - len(t.generation_prompt_ids) - 1
    after = fifth.ids[fifth.action_len:].tolist()
    assert t.tokenizer.decode(after).startswith("\n<|im_start|>user\n")
    assert not r.turns[4].canonical and r.turns[5].canonical
    assert validate_trajectory(r.trajectory().to_dict()) == []


# ----------------------------------------------------------------------------------------------
# Scores, windows, concurrency


@pytest.fixture(scope="module")
def concurrent_run(suite, tmp_path_factory):
    """Both tasks, 3 episodes each, through a pool of 4 sandboxes, with a small context budget."""
    policy = ScriptedPolicy.from_trajectories(suite.template, suite.experts)
    prefix_len = ContextPolicy(suite.template, agent_config().context).new_episode(
        split_turns(parse_trajectory(suite.experts[0]).messages)[0]).prefix_len
    config = agent_config(budget=prefix_len + 700, reserve=150, max_tool_result_tokens=100,
                          reminder_every=3)
    results = run_episodes(suite.tasks, policy, n_per_task=3, template=suite.template,
                           config=config, pool=SandboxPool(4), workdir=str(tmp_path_factory.mktemp("c")))
    return policy, config, results


def test_scripted_expert_reproduces_its_score_through_the_agent(suite, concurrent_run):
    _, _, results = concurrent_run
    by_task = {t["task_id"]: t for t in suite.experts}
    assert all(t["reward"] == 1.0 for t in suite.experts)
    assert any(t["meta"]["n_mistakes"] > 0 for t in suite.experts)   # failures and repairs too
    for r in results:
        expert = by_task[r.task_id]
        assert r.reward == expert["reward"] and r.grade_valid
        assert r.finish_reason == "submit" and len(r.turns) == len(assistant_turns(expert))
        # The tools really ran: every observation is the one the expert saw.
        assert tool_results(r.messages) == tool_results(expert["messages"])
        assert validate_trajectory(r.trajectory().to_dict()) == []


def test_half_done_expert_reproduces_partial_credit_and_stops_at_max_turns(suite, tmp_path):
    n = len(assistant_turns(suite.half))
    policy = ScriptedPolicy.from_trajectories(suite.template, [suite.half])
    [r] = run_episodes([suite.tasks[0]], policy, n_per_task=1, template=suite.template,
                       config=agent_config(max_turns=n), pool=SandboxPool(1), workdir=str(tmp_path))
    assert 0.0 < suite.half["reward"] < 1.0
    assert r.finish_reason == "max_turns" and len(r.turns) == n
    assert r.reward == suite.half["reward"]


def test_recorded_windows_equal_the_splitters(suite, concurrent_run):
    policy, config, results = concurrent_run
    context_policy = ContextPolicy(suite.template, config.context)
    assert max(len(r.windows()) for r in results) >= 3, "the budget should force several windows"
    for r in results:
        assert r.exact_replay
        recorded, replayed = r.windows(), split(r.trajectory(), context_policy)
        assert len(recorded) == len(replayed)
        for a, b in zip(recorded, replayed):
            assert (a.start_turn, a.end_turn, a.generated_turns) == \
                (b.start_turn, b.end_turn, b.generated_turns)
            for name in ("input_ids", "targets", "loss_mask", "positions", "turn_ids"):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        for t in r.turns:
            window = recorded[t.window]
            assert t.index in window.generated_turns and window.start_turn == t.start
            prompt = policy.prompts[(r.episode_id, t.index)]   # what the model was really given
            assert prompt == r.prompt_ids(t.index).tolist() == window.input_ids[:t.prompt_len].tolist()
            n = len(t.sampled_ids)
            np.testing.assert_array_equal(window.input_ids[t.prompt_len:t.prompt_len + n],
                                          t.sampled_ids)
        # RL rows: the loss falls on exactly the sampled tokens of the turns generated there.
        for row, window in zip(rollout_windows(r), recorded):
            np.testing.assert_array_equal(row.loss_mask, window.loss_mask)
            assert row.old_logprobs is None and row.routed_experts is None   # a script has none
        meta = r.trajectory().meta
        assert [w["generated_turns"] for w in meta["windows"]] == \
            [list(w.generated_turns) for w in recorded]


def test_concurrent_episodes_share_batched_generate_calls(suite, concurrent_run):
    policy, config, results = concurrent_run
    assert [r.episode_id for r in results] == [f"{t.task_id}-g{g}" for t in suite.tasks
                                               for g in range(3)]
    assert max(policy.batch_sizes) == 4 and min(policy.batch_sizes) >= 1
    # Every turn of every episode was generated, and all in as few calls as the pool allows.
    assert sum(policy.batch_sizes) == sum(len(r.turns) for r in results)
    assert len(policy.batch_sizes) < sum(len(r.turns) for r in results) / 2
    reminders = [m.content for m in results[0].messages if m.role == "user" and "[Time:" in m.content]
    assert len(reminders) == (len(results[0].turns) - 1) // config.reminder_every


# ----------------------------------------------------------------------------------------------
# Budgets


def test_timeout_ends_the_episode_and_grades_what_was_done(suite, tmp_path):
    expert = assistant_turns(suite.experts[0])
    sleep = Message("assistant", "", "Wait.", (ToolCall("s", "bash", {"cmd": "sleep 30"}),))
    script = expert[:6] + [sleep] + expert[6:]
    policy = ScriptedPolicy(suite.template, {suite.tasks[0].task_id: script})
    [r] = run_episodes([suite.tasks[0]], policy, n_per_task=1, template=suite.template,
                       config=agent_config(timeout_s=2.0), pool=SandboxPool(1), workdir=str(tmp_path))
    assert r.finish_reason == "timeout" and len(r.turns) == 7
    assert 2.0 <= r.elapsed_s < 10.0
    assert "episode time limit reached" in r.messages[-1].content
    assert r.grade_valid and 0.0 < r.reward < 1.0   # graded in a fresh sandbox, partial credit


def test_refused_submit_leaves_the_budget_to_end_the_episode(suite, tmp_path):
    """agent.submit_ends_episode=False (progressive RL's short stages): a submit halfway through the expert's
    turns is answered with the refusal and uses its turn; the expert's remaining turns still run and earn full
    credit, and the budget (max_turns), not the final submit, ends the episode. With the default, the same
    script stops at the early submit with partial credit."""
    expert = assistant_turns(suite.experts[0])
    early = Message("assistant", "", "Done?", (ToolCall("e", "submit", {"end_message": "early"}),))
    half = len(expert) // 2
    script = expert[:half] + [early] + expert[half:]
    task = suite.tasks[0]
    runs = {}
    for ends in (True, False):
        policy = ScriptedPolicy(suite.template, {task.task_id: script})
        [runs[ends]] = run_episodes([task], policy, n_per_task=1, template=suite.template,
                                    config=agent_config(max_turns=len(script), submit_ends_episode=ends),
                                    pool=SandboxPool(1), workdir=str(tmp_path / str(ends)))
    stopped, refused = runs[True], runs[False]
    assert stopped.finish_reason == "submit" and len(stopped.turns) == half + 1
    assert stopped.grade_valid and 0.0 < stopped.reward < 1.0
    assert refused.finish_reason == "max_turns" and len(refused.turns) == len(script)
    assert refused.grade_valid and refused.reward == 1.0
    results = tool_results(refused.messages)
    refusal = AgentConfig.submit_refused_message
    assert results[half] == refusal and results[-1] == refusal   # the early submit and the expert's own
    assert results[:half] == tool_results(stopped.messages)[:half]
    with pytest.raises(ValueError, match="submit_ends_episode"):
        agent_config(submit_ends_episode="no")


def test_max_tokens_cuts_the_last_turn_and_ends_the_episode(suite, tmp_path):
    expert = assistant_turns(suite.experts[1])
    lengths = [len(suite.template.completion_ids(m)) for m in expert]
    budget = sum(lengths[:3]) + 5
    policy = ScriptedPolicy.from_trajectories(suite.template, [suite.experts[1]])
    [r] = run_episodes([suite.tasks[1]], policy, n_per_task=1, template=suite.template,
                       config=agent_config(max_total_tokens=budget), pool=SandboxPool(1),
                       workdir=str(tmp_path))
    assert r.finish_reason == "max_tokens" and len(r.turns) == 4
    assert r.sampled_tokens == budget
    last = r.turns[-1]
    assert last.finish == "length" and last.n_forced == 1 and len(last.sampled_ids) == 5
    assert "cut off" in r.messages[-1].content
    assert not r.exact_replay
    # Rows train only what was sampled: the appended end-of-turn token carries no loss.
    rows = rollout_windows(r)
    assert sum(int(row.loss_mask.sum()) for row in rows) == r.sampled_tokens
    assert validate_trajectory(r.trajectory().to_dict()) == []


def test_per_turn_token_cap_cuts_every_turn(suite, tmp_path):
    policy = ScriptedPolicy.from_trajectories(suite.template, [suite.experts[0]])
    [r] = run_episodes([suite.tasks[0]], policy, n_per_task=1, template=suite.template,
                       config=agent_config(max_new_tokens_per_turn=6, max_turns=3),
                       pool=SandboxPool(1), workdir=str(tmp_path))
    assert r.finish_reason == "max_turns"
    assert [len(t.sampled_ids) for t in r.turns] == [6, 6, 6]
    assert all(t.finish == "length" and t.n_forced == 1 for t in r.turns)
    # The context holds the sampled ids plus the appended end-of-turn token, nothing else.
    g = len(suite.template.generation_prompt_ids)
    for t, rendered in zip(r.turns, r.context.turns):
        np.testing.assert_array_equal(rendered.ids[g:rendered.action_len - 1], t.sampled_ids)
        assert rendered.ids[rendered.action_len - 1] in suite.template.stop_ids


def test_episode_limits_take_the_agent_timeouts_and_disk_limit():
    from klong_jax.agent.runner import episode_limits
    from klong_jax.sandbox import SandboxLimits, SandboxPool
    pool = SandboxPool(1, limits=SandboxLimits(command_timeout_s=50.0))
    ctx = ContextConfig(budget_tokens=1024, reserve_tokens=128)
    limits = episode_limits(pool, AgentConfig(context=ctx, timeout_s=30.0, disk_mib=64))
    assert (limits.episode_timeout_s, limits.command_timeout_s, limits.disk_bytes) == (30.0, 50.0, 64 << 20)
    assert episode_limits(pool, AgentConfig(context=ctx)).disk_bytes is None   # 0: the pool's (unbounded)
    with pytest.raises(ValueError, match="disk_mib"):
        AgentConfig(context=ctx, disk_mib=-1)


def test_rollout_progress_bounds_the_steps_left():
    from klong_jax.agent.runner import RolloutProgress
    # Live episodes at turns 3 and 7 of 10 (7 steps left at most), 5 pending in waves of 2 (3 waves x 10 turns).
    p = RolloutProgress(step=4, done=1, total=8, live=2, pending=5, max_concurrent=2, max_turns=10,
                        live_turns=(3, 7), sampled_tokens=400, elapsed_s=20.0)
    assert p.steps_left_bound() == 7 + 3 * 10
    # 5 s per step so far: ETA <= 37 x 5 = 185 s; 400 tokens / 20 s.
    assert p.line() == ("step 4 | episodes 1/8 done, 2 running | sampled 400 tokens, 20.0 tokens/s | "
                        "elapsed 0m20s | ETA <= 3m05s")


def test_evaluate_prints_progress_lines(suite, tmp_path):
    task = suite.tasks[0]
    script = [Message("assistant", "", "Stop here.", (ToolCall("c", "submit", {"end_message": "bye"}),))]
    lines = []
    evaluate([task], ScriptedPolicy(suite.template, {task.task_id: script}), template=suite.template,
             config=agent_config(), workdir=str(tmp_path), pool=SandboxPool(1), print_fn=lines.append)
    progress = [line for line in lines if line.startswith("[eval] step ")]
    assert progress and "episodes 1/1 done, 0 running" in progress[-1] and "ETA <= 0m00s" in progress[-1]
