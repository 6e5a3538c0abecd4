"""GLM-4.5 chat template: exact rendering, per-token roles, render->parse round trips, and a parser
that reports malformed model output instead of crashing."""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from klong_jax.data.chat_template import (ROLE_CODES, TEMPLATE_TOKENS, Glm45Template, _Special,
                                          parse_pieces)
from klong_jax.data.synthetic import build_tokenizers
from klong_jax.data.trajectory import Message, ToolCall
from tokenizer_helpers import CONVERSATION, arg_types_of as _arg_types, assistant_strategies, normalised as _norm


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    toks = build_tokenizers(str(tmp_path_factory.mktemp("tok")))
    return {k: Glm45Template(t) for k, t in toks.items()}


GLM_TEXT = (
    "[gMASK]<sop><|system|>\nYou are an agent.<|user|>\nReproduce the paper.<|assistant|>\n"
    "<think>List files first.</think>\nLet me look.\n"
    "<tool_call>bash\n<arg_key>cmd</arg_key>\n<arg_value>ls -la</arg_value>\n"
    "<arg_key>timeout</arg_key>\n<arg_value>30</arg_value>\n</tool_call>\n"
    "<tool_call>read_file_chunk\n<arg_key>file</arg_key>\n<arg_value>p.md</arg_value>\n"
    "<arg_key>flags</arg_key>\n<arg_value>[\"a\", 1]</arg_value>\n</tool_call><|observation|>\n"
    "<tool_response>\na.py\nb.py\n</tool_response>\n<tool_response>\n# Title\n</tool_response>"
    "<|assistant|>\n<think></think>\nNothing to call.<|user|>\nContinue.<|assistant|>\n"
    "<think></think>\n<tool_call>submit\n<arg_key>end_message</arg_key>\n<arg_value>done"
    "</arg_value>\n</tool_call><|observation|>")


@pytest.mark.parametrize("kind", ["sp", "hf"])
def test_renders_glm45_format(templates, kind):
    tpl = templates[kind]
    r = tpl.render(CONVERSATION)
    assert tpl.tokenizer.decode(r.input_ids) == GLM_TEXT
    # Compositional: the conversation is the concatenation of its messages.
    ids, prev = list(tpl.format_prefix_ids), None
    for m in CONVERSATION:
        ids += tpl.render_message(m, prev)[0]
        prev = m
    assert r.input_ids.tolist() == ids


def test_per_token_roles_turns_and_trainable(templates):
    tpl = templates["sp"]
    r = tpl.render(CONVERSATION)
    ids = tpl.ids
    assert r.turn_index[r.message_index <= 1].tolist() == [-1] * int((r.message_index <= 1).sum())
    assert set(r.turn_index[r.message_index >= 2].tolist()) == {0, 1, 2}
    assert (r.roles[r.trainable] == ROLE_CODES["assistant"]).all()
    # Role tokens of assistant messages are prompts; their end-of-turn tokens are generated.
    assistant_role = r.input_ids == ids["<|assistant|>"]
    assert not r.trainable[assistant_role].any()
    for msg_i, eot in ((2, "<|observation|>"), (5, "<|user|>"), (7, "<|observation|>")):
        last = np.flatnonzero(r.message_index == msg_i)[-1]
        assert r.input_ids[last] == ids[eot] and r.trainable[last]
    assert not r.trainable[r.roles != ROLE_CODES["assistant"]].any()
    # The user message after a no-call turn does not repeat <|user|> (the turn emitted it).
    first_user_tok = np.flatnonzero(r.message_index == 6)[0]
    assert r.input_ids[first_user_tok] != ids["<|user|>"]


text = st.text(max_size=40) | st.sampled_from(["", "\n", "\n\nx\n", "a </tool_call> <|user|>"])
tool_call, assistant = assistant_strategies(text)


@pytest.mark.parametrize("kind", ["sp", "hf"])
@settings(max_examples=60, deadline=None)
@given(message=assistant)
def test_render_then_parse_gives_back_the_message(templates, kind, message):
    tpl = templates[kind]
    ids, _ = tpl.render_message(message)
    parsed = tpl.parse_assistant(ids, arg_types=_arg_types(message))
    assert parsed.errors == () and parsed.finished
    assert parsed.message == _norm(message)
    assert parsed.end_token == ("<|observation|>" if message.tool_calls else "<|user|>")


@settings(max_examples=30, deadline=None)
@given(message=assistant)
def test_text_parse_matches_id_parse(templates, message):
    """From text (a chat API), parsing agrees wherever the text does not quote the tags."""
    tpl = templates["hf"]
    ids, _ = tpl.render_message(message)
    decoded = tpl.tokenizer.decode(ids)
    if any(t in s for t in TEMPLATE_TOKENS
           for s in [message.content, message.reasoning or ""] + [
               json.dumps(c.arguments, ensure_ascii=False) for c in message.tool_calls]):
        return
    by_text = tpl.parse_assistant_text(decoded, arg_types=_arg_types(message))
    assert by_text.message == _norm(message) and by_text.errors == ()


def test_untyped_arguments_decode_json_but_keep_strings(templates):
    tpl = templates["sp"]
    m = Message("assistant", "", None, (ToolCall("i", "f", {"n": 3, "s": "x y", "q": '"quoted"'}),))
    parsed = tpl.parse_assistant(tpl.render_message(m)[0])
    assert parsed.message.tool_calls[0].arguments == {"n": 3, "s": "x y", "q": '"quoted"'}


MALFORMED = [
    ("\n<think>r</think>\n<tool_call>bash\n<arg_key>cmd</arg_key>\n<arg_value>ls", "expected </arg_value>"),
    ("\n<think></think>\n<tool_call>\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n"
     "</tool_call><|observation|>", "without a name"),
    ("<think></think><tool_call>f\n<arg_key>a</arg_key>\n</tool_call><|observation|>",
     "expected <arg_value>"),
    ("<think></think><tool_call>f\n<arg_value>1</arg_value></tool_call><|observation|>",
     "unexpected <arg_value> inside the tool call"),
    ("<think></think><tool_call>f\n<arg_key>a</arg_key><arg_value>1</arg_value><arg_key>a</arg_key>"
     "<arg_value>2</arg_value></tool_call><|observation|>", "given twice"),
    ("<think></think><tool_call>f\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call> oops"
     "<|observation|>", "text after tool call"),
    ("<think></think>hi<|user|>more", "after the end-of-turn"),
    ("<think></think>hi<|system|>x", "unexpected token '<|system|>'"),
    ("<think>never closed<|user|>", "expected </think>"),
    ("<think></think><tool_call>f\n<arg_key>n</arg_key><arg_value>notjson</arg_value></tool_call>"
     "<|observation|>", "expected a JSON integer"),
    ("stray<think></think>x<|user|>", "text before <think>"),
]


@pytest.mark.parametrize("kind", ["sp", "hf"])
@pytest.mark.parametrize("output, fragment", MALFORMED)
def test_malformed_output_is_reported(templates, kind, output, fragment):
    tpl = templates[kind]
    pieces = tpl.pieces_from_text(output)
    ids = []
    for p in pieces:
        ids += [tpl.ids[p]] if isinstance(p, _Special) else tpl.tokenizer.encode(p)
    parsed = tpl.parse_assistant(ids, arg_types={"f": {"n": "integer"}})
    assert any(fragment in e for e in parsed.errors), parsed.errors


def test_cut_off_generation_is_not_finished(templates):
    tpl = templates["sp"]
    ids, _ = tpl.render_message(CONVERSATION[5])
    parsed = tpl.parse_assistant(ids[:-1])
    assert not parsed.finished and parsed.errors == ()
    assert parsed.message.content == "Nothing to call."


piece = st.sampled_from([_Special(t) for t in TEMPLATE_TOKENS]) | st.text(max_size=8)


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(piece, max_size=25))
def test_parser_never_raises(pieces):
    parsed = parse_pieces(pieces, arg_types={"f": {"a": "integer"}})
    assert isinstance(parsed.errors, tuple)
    assert parsed.message.role == "assistant"
