"""ContextPolicy: budget, prefix rule, dropping the oldest history, middle-truncation of tool results,
and the agent's view/add_turn loop giving the same contexts as the splitter's replay. Every test runs with the
GLM-4.5 template and with ChatML (a multi-token generation prompt; separators owned by the next message)."""
import math

import numpy as np
import pytest

from klong_jax.data.chat_template import ChatMLTemplate, Glm45Template
from klong_jax.data.context import ContextConfig, ContextOverflow, ContextPolicy
from klong_jax.data.synthetic import build_tokenizers, random_text, synthetic_trajectory
from klong_jax.data.trajectory import Message, ToolCall, split_turns


@pytest.fixture(scope="module", params=["glm45", "chatml"])
def template(request, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tok"))
    if request.param == "chatml":
        from tokenizer_helpers import chatml_tokenizer
        return ChatMLTemplate(chatml_tokenizer(directory))
    return Glm45Template(build_tokenizers(directory)["sp"])


def _trajectory(seed=0, n_turns=20, **kw):
    return synthetic_trajectory(np.random.default_rng(seed), n_turns=n_turns, p_long_tool=0.0, **kw)


def _expected_starts(ep, cfg):
    """The rule of klong_method.md, written out directly over the episode's turn lengths."""
    P, lengths = ep.prefix_len, [len(t) for t in ep.turns]
    s, starts = 0, []
    for j, turn in enumerate(ep.turns):
        need = max(cfg.reserve_tokens, turn.action_len)
        while s < j and P + sum(lengths[s:j]) + need > cfg.budget_tokens:
            if cfg.drop_unit == "turns":
                s += max(1, math.ceil(cfg.drop_fraction * (j - s) - 1e-9))
            else:
                total, dropped, s0 = sum(lengths[s:j]), 0, s
                while True:
                    dropped += lengths[s]
                    s += 1
                    if s >= j or dropped >= cfg.drop_fraction * total:
                        break
                assert s > s0
        starts.append(s)
    return starts


@pytest.mark.parametrize("drop_unit", ["turns", "tokens"])
@pytest.mark.parametrize("drop_fraction", [0.0, 0.3, 0.5, 1.0])
def test_drops_oldest_fraction_only_when_needed(template, drop_unit, drop_fraction):
    traj = _trajectory(n_turns=25)
    cfg = ContextConfig(budget_tokens=900, reserve_tokens=120, drop_fraction=drop_fraction,
                        drop_unit=drop_unit)
    ep = ContextPolicy(template, cfg).replay(traj.messages)
    assert ep.starts == _expected_starts(ep, cfg)
    assert len(set(ep.starts)) > 2, "the budget should force several drops"
    for j, s in enumerate(ep.starts):
        assert ep.prefix_len + ep.history_tokens(s, j) + ep.turns[j].action_len <= cfg.budget_tokens
        if j and s != ep.starts[j - 1]:   # the previous start did not fit any more
            s0 = ep.starts[j - 1]
            need = max(cfg.reserve_tokens, ep.turns[j].action_len)
            assert ep.prefix_len + ep.history_tokens(s0, j) + need > cfg.budget_tokens


def test_no_drop_when_everything_fits(template):
    traj = _trajectory(n_turns=6)
    ep = ContextPolicy(template, ContextConfig(budget_tokens=100_000)).replay(traj.messages)
    assert ep.starts == [0] * 6


def test_prefix_is_system_and_task(template):
    traj = _trajectory(n_turns=3)
    ep = ContextPolicy(template, ContextConfig(budget_tokens=100_000)).replay(traj.messages)
    assert [m.role for m in ep.prefix_messages] == ["system", "user"]
    assert ep.prefix_ids.tolist() == template.render(traj.messages[:2]).input_ids.tolist()


def test_long_tool_result_is_middle_truncated(template):
    long = "HEAD " + random_text(np.random.default_rng(1), 3000, tricky=0.0) + " TAIL"
    msgs = [Message("system", "sys"), Message("user", "task"),
            Message("assistant", "", "r", (ToolCall("a", "bash", {"cmd": "cat big"}),
                                           ToolCall("b", "bash", {"cmd": "echo"}))),
            Message("tool", long, tool_call_id="a"), Message("tool", "small", tool_call_id="b"),
            Message("assistant", "ok")]
    cfg = ContextConfig(budget_tokens=600, reserve_tokens=100)
    ep = ContextPolicy(template, cfg).replay(msgs)
    turn = ep.turns[0]
    assert ep.prefix_len + len(turn) + cfg.reserve_tokens <= cfg.budget_tokens
    assert len(turn.truncations) == 1 and turn.truncations[0].observation == 0
    cut = turn.messages[1].content
    assert cut.startswith("HEAD ") and cut.endswith(" TAIL") and "characters truncated" in cut
    assert turn.messages[2].content == "small"          # the short result is left alone
    removed = turn.truncations[0].removed_chars
    assert f"[... {removed} characters truncated ...]" in cut
    assert len(cut) - len(f"\n[... {removed} characters truncated ...]\n") == len(long) - removed
    # The cut uses the room left by the prefix, the reserve, the action and the other result.
    small = len(template.render_message(turn.messages[2], turn.messages[1])[0])
    room = cfg.budget_tokens - cfg.reserve_tokens - ep.prefix_len - turn.action_len - small
    assert room - 3 <= turn.truncations[0].tokens <= room
    assert ep.starts == [0, 0]


def test_tool_result_cap(template):
    traj = _trajectory(n_turns=8, tool_words=(100, 200))
    cfg = ContextConfig(budget_tokens=100_000, max_tool_result_tokens=60)
    ep = ContextPolicy(template, cfg).replay(traj.messages)
    n_tool = 0
    for turn in ep.turns:
        prev = turn.messages[0]
        for m in turn.messages[1:]:
            if m.role == "tool":
                assert len(template.render_message(m, prev)[0]) <= 60
                n_tool += 1
            prev = m
    assert n_tool and sum(len(t.truncations) for t in ep.turns) == n_tool


def test_agent_loop_sees_what_the_splitter_replays(template):
    """The agent asks for a view before each turn (without knowing its length), generates at most
    max_new_tokens, and adds the turn; the replay of the recorded episode gives the same starts,
    the same truncations and the same prompts."""
    traj = synthetic_trajectory(np.random.default_rng(3), n_turns=30, p_long_tool=0.1,
                                long_tool_words=800)
    cfg = ContextConfig(budget_tokens=1200, reserve_tokens=200)
    policy = ContextPolicy(template, cfg)
    prefix, turns = split_turns(traj.messages)
    agent = policy.new_episode(prefix)
    prompts = []
    first_view = agent.view()
    for turn in turns:
        view = agent.view()
        prompt = agent.prompt_ids(view)
        assert len(prompt) == view.context_tokens
        assert view.context_tokens + view.max_new_tokens == cfg.budget_tokens
        msgs = agent.context_messages(view)     # the same context, for a chat-API model
        assert template.render(msgs).input_ids.tolist() + template.generation_prompt_ids == \
            prompt.tolist()
        generated = template.completion_ids(turn.assistant)   # the "sampled" ids
        assert len(generated) <= view.max_new_tokens
        agent.add_turn(turn.assistant, turn.observations, action_ids=generated)
        prompts.append(prompt)
    with pytest.raises(ValueError, match="a view for turn 0, but the next turn is"):
        agent.prompt_ids(first_view)
    replay = policy.replay(traj.messages)
    assert replay.starts == agent.starts and len(set(agent.starts)) > 2
    assert any(t.truncations for t in agent.turns)
    for a, b in zip(agent.turns, replay.turns):
        assert a.ids.tolist() == b.ids.tolist() and a.truncations == b.truncations


def test_overflow_errors_are_clear(template):
    big_task = [Message("user", random_text(np.random.default_rng(0), 2000))]
    with pytest.raises(ContextOverflow, match="the prefix has .* tokens"):
        ContextPolicy(template, ContextConfig(budget_tokens=500, reserve_tokens=50)).new_episode(
            big_task)
    ep = ContextPolicy(template, ContextConfig(budget_tokens=300, reserve_tokens=50)).new_episode(
        [Message("user", "task")])
    with pytest.raises(ContextOverflow, match="turn 0: the assistant message has"):
        ep.add_turn(Message("assistant", random_text(np.random.default_rng(0), 1000)))
    ep.view()
    with pytest.raises(ContextOverflow, match="exceed the view's max_new_tokens"):
        ep.add_turn(Message("assistant", "x"), action_ids=[5] * 400)


@pytest.mark.parametrize("bad, fragment", [
    (dict(budget_tokens=0), "budget_tokens"),
    (dict(budget_tokens=100, reserve_tokens=100), "reserve_tokens"),
    (dict(budget_tokens=100, reserve_tokens=10, drop_fraction=1.5), "drop_fraction"),
    (dict(budget_tokens=100, reserve_tokens=10, drop_unit="bytes"), "drop_unit"),
    (dict(budget_tokens=100, reserve_tokens=10, truncation_marker="[cut]"), "{chars}"),
])
def test_config_validation(bad, fragment):
    with pytest.raises(ValueError, match=fragment.replace("{", r"\{").replace("}", r"\}")):
        ContextConfig(**bad)


def test_config_from_mapping():
    cfg = ContextConfig.from_mapping({"budget_tokens": 4096, "drop_fraction": 0.25})
    assert cfg.drop_fraction == 0.25 and cfg.reserve_tokens == 1024
    with pytest.raises(ValueError, match="unknown context config key"):
        ContextConfig.from_mapping({"budget_tokens": 4096, "budget": 1})
