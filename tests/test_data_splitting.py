"""Trajectory splitting, property-tested over random trajectories and policies (hypothesis), with the GLM-4.5
template (SentencePiece and tokenizer.json backends) and with ChatML."""
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from klong_jax.data.chat_template import ROLE_CODES, ChatMLTemplate, Glm45Template
from klong_jax.data.context import ContextConfig, ContextPolicy
from klong_jax.data.splitting import sft_example, split
from klong_jax.data.synthetic import build_tokenizers, synthetic_trajectory
from klong_jax.data.trajectory import split_turns


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    from tokenizer_helpers import chatml_tokenizer
    directory = str(tmp_path_factory.mktemp("tok"))
    templates = {k: Glm45Template(t) for k, t in build_tokenizers(directory).items()}
    return templates | {"chatml": ChatMLTemplate(chatml_tokenizer(directory))}


@st.composite
def cases(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    traj = synthetic_trajectory(
        np.random.default_rng(seed), n_turns=draw(st.integers(1, 24)),
        prefix_words=draw(st.integers(5, 120)), tool_words=(1, draw(st.integers(2, 120))),
        reasoning_words=(0, draw(st.integers(1, 30))), p_nudge=draw(st.floats(0, 0.5)),
        p_long_tool=draw(st.sampled_from([0.0, 0.1])), long_tool_words=400,
        submit=draw(st.booleans()))
    return dict(traj=traj, kind=draw(st.sampled_from(["sp", "hf", "chatml"])),
                reserve=draw(st.integers(1, 150)), slack=draw(st.integers(0, 600)),
                drop_fraction=draw(st.sampled_from([0.0, 0.1, 0.3, 0.5, 1.0])),
                drop_unit=draw(st.sampled_from(["turns", "tokens"])),
                train_overlap=draw(st.booleans()))


def _policy(template, case):
    """A budget that always admits the prefix and any single assistant message, plus slack."""
    prefix, turns = split_turns(case["traj"].messages)
    P = len(template.render(prefix))
    biggest = max(len(template.render_message(t.assistant)[0]) for t in turns)
    cfg = ContextConfig(budget_tokens=P + max(case["reserve"], biggest) + case["slack"],
                        reserve_tokens=case["reserve"], drop_fraction=case["drop_fraction"],
                        drop_unit=case["drop_unit"])
    return ContextPolicy(template, cfg)


def _agent_prompts(policy, messages):
    """The prompt an agent running this policy is given for each turn."""
    prefix, turns = split_turns(messages)
    ep = policy.new_episode(prefix)
    prompts = []
    for turn in turns:
        prompts.append(ep.prompt_ids(ep.view(len(policy.template.render_message(turn.assistant)[0]))))
        ep.add_turn(turn.assistant, turn.observations)
    return prompts


@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_window_invariants(templates, case):
    template = templates[case["kind"]]
    policy = _policy(template, case)
    C = policy.config.budget_tokens
    messages = case["traj"].messages
    windows = split(case["traj"], policy, train_overlap=case["train_overlap"])
    prefix, turns = split_turns(messages)
    prefix_ids = template.render(prefix).input_ids
    prompts = _agent_prompts(policy, messages)
    trained_in = Counter()
    covered = []
    g = len(template.generation_prompt_ids)
    for k, w in enumerate(windows):
        L = len(w)
        assert w.index == k and L <= C
        # The same prefix, unchanged, in every window.
        assert w.prefix_len == len(prefix_ids)
        assert w.input_ids[:w.prefix_len].tolist() == prefix_ids.tolist()
        assert w.positions.tolist() == list(range(L))
        assert w.targets[:-1].tolist() == w.input_ids[1:].tolist() and w.loss_mask[-1] == 0
        # Loss only on generated assistant tokens (never the generation prompt, prefix, tools).
        nxt_roles = w.roles[1:][w.loss_mask[:-1] == 1]
        assert (nxt_roles == ROLE_CODES["assistant"]).all()
        for j in range(w.start_turn, w.end_turn + 1):
            first = int(np.flatnonzero(w.turn_ids == j)[0])   # turn j opens with its generation prompt
            assert w.input_ids[first:first + g].tolist() == template.generation_prompt_ids
            assert not w.loss_mask[first - 1:first - 1 + g].any()   # no prompt token is a target
        trained_turns = set(w.turn_ids[1:][w.loss_mask[:-1] == 1].tolist())
        assert trained_turns == set(w.trained_turns)
        assert set(w.generated_turns) <= trained_turns
        assert case["train_overlap"] or w.trained_turns == w.generated_turns
        assert w.generated_turns == tuple(range(w.generated_turns[0], w.end_turn + 1))
        # The window ends with the assistant message of its last turn.
        assert w.turn_ids[-1] == w.end_turn and w.input_ids[-1] in template.stop_ids
        for j in w.generated_turns:
            # Its causal context is exactly the agent's prompt for turn j.
            first = int(np.flatnonzero(w.turn_ids == j)[0])
            assert w.input_ids[:first + g].tolist() == prompts[j].tolist()
        for j in w.trained_turns:
            trained_in[j] += 1
            # All of turn j's generated tokens carry loss here.
            n_gen = int(template.render_message(turns[j].assistant)[1].count(True))
            assert int((w.loss_mask[:-1] == 1)[w.turn_ids[1:] == j].sum()) == n_gen
        covered += list(w.generated_turns)
        if k:
            assert w.start_turn > windows[k - 1].start_turn       # progressive truncation
            assert w.start_turn <= windows[k - 1].end_turn + 1    # no turn is skipped
    assert covered == list(range(len(turns)))                     # each turn generated once
    if case["train_overlap"]:
        assert all(trained_in[j] >= 1 for j in range(len(turns)))
    else:
        assert all(trained_in[j] == 1 for j in range(len(turns)))


@settings(max_examples=25, deadline=None)
@given(case=cases())
def test_a_trajectory_that_fits_is_plain_sft(templates, case):
    template = templates[case["kind"]]
    policy = ContextPolicy(template, ContextConfig(budget_tokens=10**6,
                                                   reserve_tokens=case["reserve"]))
    windows = split(case["traj"], policy, train_overlap=case["train_overlap"])
    assert len(windows) == 1
    plain = sft_example(template, case["traj"].messages)
    for name in ("input_ids", "targets", "loss_mask", "positions"):
        assert getattr(windows[0], name).tolist() == plain[name].tolist(), name


def test_overlap_turns_are_context_unless_configured(templates):
    traj = synthetic_trajectory(np.random.default_rng(5), n_turns=30, p_long_tool=0.0)
    template = templates["sp"]
    cfg = ContextConfig(budget_tokens=1000, reserve_tokens=150, drop_fraction=0.3)
    plain = split(traj, ContextPolicy(template, cfg))
    overlap = split(traj, ContextPolicy(template, cfg), train_overlap=True)
    assert len(plain) == len(overlap) > 2
    for a, b in zip(plain, overlap):
        assert a.input_ids.tolist() == b.input_ids.tolist()
        assert b.loss_mask.sum() >= a.loss_mask.sum()
    assert sum(b.loss_mask.sum() for b in overlap) > sum(a.loss_mask.sum() for a in plain)
    later = plain[1]
    assert later.generated_turns[0] > later.start_turn   # the window starts with overlap turns
