"""ChatML template: exact layout and per-token attribution, the default system message, parity with the model's
own template through transformers (SmolLM2 GGUF), render -> parse round trips, a parser that reports malformed
output and never raises, and choosing a template by name."""
import json

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from klong_jax.agent.turn import feedback_message, parse_turn
from klong_jax.data.chat_template import (CHAT_TEMPLATE_NAMES, ROLE_CODES, ChatMLTemplate, Glm45Template, _Special,
                                          default_system_message, make_chat_template)
from klong_jax.data.chatml_template import END_THINK, THINK, TOOL_CALL
from klong_jax.data.synthetic import build_tokenizers
from klong_jax.data.tokenizer import load_tokenizer
from klong_jax.data.trajectory import Message, ToolCall
from klong_jax.serving import openai_api
from klong_jax.sampling.types import Completion
from tokenizer_helpers import (CONVERSATION, CONVERSATIONS, arg_types_of as _arg_types, assistant_strategies,
                               chatml_tokenizer, normalised as _norm, smollm2_path, smollm2_reference,
                               write_tiny_gguf)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return chatml_tokenizer(str(tmp_path_factory.mktemp("chatml")))


@pytest.fixture(scope="module")
def tpl(tok):
    return ChatMLTemplate(tok)


@pytest.fixture(scope="module")
def tiny_tpl(tmp_path_factory):
    return ChatMLTemplate(load_tokenizer(write_tiny_gguf(str(tmp_path_factory.mktemp("g") / "t.gguf")), cache=False))


@pytest.fixture(scope="module")
def smollm2_tpl():
    return make_chat_template(load_tokenizer(smollm2_path()))


CHATML_TEXT = (
    "<|im_start|>system\nYou are an agent.<|im_end|>"
    "\n<|im_start|>user\nReproduce the paper.<|im_end|>"
    "\n<|im_start|>assistant\n<think>List files first.</think>\nLet me look.\n"
    '<tool_call>{"name": "bash", "arguments": {"cmd": "ls -la", "timeout": 30}}</tool_call>\n'
    '<tool_call>{"name": "read_file_chunk", "arguments": {"file": "p.md", "flags": ["a", 1]}}</tool_call><|im_end|>'
    "\n<|im_start|>tool\na.py\nb.py<|im_end|>"
    "\n<|im_start|>tool\n# Title<|im_end|>"
    "\n<|im_start|>assistant\nNothing to call.<|im_end|>"
    "\n<|im_start|>user\nContinue.<|im_end|>"
    '\n<|im_start|>assistant\n<tool_call>{"name": "submit", "arguments": {"end_message": "done"}}</tool_call>'
    "<|im_end|>")


def test_renders_chatml_layout(tpl):
    r = tpl.render(CONVERSATION)
    assert tpl.tokenizer.decode(r.input_ids) == CHATML_TEXT
    # Compositional: the conversation is the concatenation of its messages.
    ids, prev = [], None
    for m in CONVERSATION:
        ids += tpl.render_message(m, prev)[0]
        prev = m
    assert r.input_ids.tolist() == ids
    # ChatML closes the conversation with "\n"; the generation prompt follows directly instead.
    assert tpl.tokenizer.decode(tpl.conversation_ids(CONVERSATION)) == CHATML_TEXT + "\n"
    assert tpl.tokenizer.decode(tpl.conversation_ids(CONVERSATION, add_generation_prompt=True)) == \
        CHATML_TEXT + "\n<|im_start|>assistant\n"


def _body_text(m: Message) -> str:
    """The body layout written out: blocks joined by "\n" (think if reasoning, content if any, one per call)."""
    blocks = ([f"<think>{m.reasoning}</think>"] if m.reasoning else []) + ([m.content] if m.content else [])
    blocks += [f"<tool_call>{json.dumps({'name': c.name, 'arguments': c.arguments})}</tool_call>"
               for c in m.tool_calls]
    return "\n".join(blocks)


def test_per_token_attribution(tpl):
    """Each message owns its opening "\\n<|im_start|>{role}\\n" (the first message has no "\\n"); an assistant
    message is the generation prompt (not trainable) then body + <|im_end|> (trainable); nothing else is."""
    r, tok = tpl.render(CONVERSATION), tpl.tokenizer
    nl, im_start, im_end = tok.encode("\n"), tpl.ids["<|im_start|>"], tpl.ids["<|im_end|>"]
    gp = tpl.generation_prompt_ids
    assert gp == nl + [im_start] + tok.encode("assistant\n")
    assert tok.decode(gp) == "\n<|im_start|>assistant\n"
    turn_of = [-1, -1, 0, 0, 0, 1, 1, 2]   # prefix, then assistant k with what answers it
    n_trainable = 0
    for i, m in enumerate(CONVERSATION):
        at = np.flatnonzero(r.message_index == i)
        assert at.tolist() == list(range(at[0], at[-1] + 1))          # contiguous
        ids, train = r.input_ids[at].tolist(), r.trainable[at].tolist()
        assert (r.roles[at] == ROLE_CODES[m.role]).all() and (r.turn_index[at] == turn_of[i]).all()
        opening = (nl if i else []) + [im_start]
        assert ids[:len(opening)] == opening and ids[-1] == im_end
        if m.role == "assistant":
            body = tok.encode(_body_text(m))   # the body is one text run (the tags are plain text here)
            assert ids == gp + body + [im_end]
            assert train == [False] * len(gp) + [True] * (len(body) + 1)
            assert ids[len(gp):] == tpl.completion_ids(m)
            n_trainable += len(body) + 1
        else:
            assert not any(train)
            assert ids == (nl if i else []) + [im_start] + tok.encode(f"{m.role}\n{m.content}") + [im_end]
    assert int(r.trainable.sum()) == n_trainable
    assert (r.message_index >= 0).all() and len(r) == int(sum((r.message_index == i).sum() for i in range(8)))


def test_generation_prompt_stop_ids_and_assistant_ids(tpl):
    im_end, eot = tpl.ids["<|im_end|>"], tpl.ids["<|endoftext|>"]
    assert tpl.stop_ids == (im_end, eot) and tpl.format_prefix_ids == []
    for m in CONVERSATION:
        if m.role == "assistant":
            assert tpl.end_of_turn_id(m) == im_end
            action = tpl.completion_ids(m)
            assert action[-1] == im_end
            assert tpl.assistant_ids(action) == tpl.render_message(m, CONVERSATION[0])


def test_default_system_message_is_inserted_as_format_tokens(tiny_tpl):
    assert tiny_tpl.default_system == "You are tiny."
    tok = tiny_tpl.tokenizer
    r = tiny_tpl.render([Message("user", "hi")])
    assert tok.decode(r.input_ids) == "<|im_start|>system\nYou are tiny.<|im_end|>\n<|im_start|>user\nhi<|im_end|>"
    n = len(tiny_tpl.render_message(Message("system", "You are tiny."))[0])
    assert (r.roles[:n] == ROLE_CODES["format"]).all() and (r.message_index[:n] == -1).all()
    assert (r.roles[n:] == ROLE_CODES["user"]).all() and (r.message_index[n:] == 0).all()
    assert not r.trainable.any()
    # Not inserted when the conversation has a system message, nor when the template has none.
    own = tiny_tpl.render([Message("system", "Mine."), Message("user", "hi")])
    assert tok.decode(own.input_ids) == "<|im_start|>system\nMine.<|im_end|>\n<|im_start|>user\nhi<|im_end|>"
    bare = ChatMLTemplate(tok, default_system=None)
    assert tok.decode(bare.render([Message("user", "hi")]).input_ids) == "<|im_start|>user\nhi<|im_end|>"
    # No messages: the generation prompt alone, without the "\n" that separates it from a message.
    assert tok.decode(tiny_tpl.conversation_ids([], add_generation_prompt=True)) == "<|im_start|>assistant\n"


@pytest.mark.parametrize("template, expected", [
    # SmolLM2's shape: a newline inside a single-quoted literal.
    ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
     "{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}"
     "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}",
     "You are helpful"),
    # Qwen2.5's shape: escaped newlines, a trim marker, an apostrophe escaped inside the literal.
    ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
     "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou\\'re Qwen. Be helpful.<|im_end|>\\n' }}"
     "{%- endif %}", "You're Qwen. Be helpful."),
    # Double quotes, and a default written as raw template text.
    ('{% if messages[0].role != "system" %}{{ "<|im_start|>system\\nDouble<|im_end|>\\n" }}{% endif %}', "Double"),
    ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nRaw text default<|im_end|>\n{% endif %}",
     "Raw text default"),
    # Only the generic per-message form: no default.
    ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}",
     None),
    ("", None),
    (None, None),
])
def test_default_system_message_from_the_jinja_template(template, expected):
    assert default_system_message(template) == expected


def test_two_different_default_system_messages_are_an_error():
    both = "{{ '<|im_start|>system\nA<|im_end|>' }}{{ '<|im_start|>system\nB<|im_end|>' }}"
    with pytest.raises(ValueError, match=r"tok.gguf: the chat template spells out 2 different default system"):
        default_system_message(both, source="tok.gguf")


# ---------------------------------------------------------------------------------------------
# The real model's template, through transformers


def test_smollm2_plain_conversations_equal_transformers(smollm2_tpl):
    assert isinstance(smollm2_tpl, ChatMLTemplate)
    assert smollm2_tpl.default_system.startswith("You are a helpful AI assistant named SmolLM")
    ref = smollm2_reference()
    for conv, want in zip(CONVERSATIONS, ref["chat"]):
        msgs = [Message(m["role"], m["content"]) for m in conv]
        assert smollm2_tpl.conversation_ids(msgs) == want["plain"], conv
        assert smollm2_tpl.conversation_ids(msgs, add_generation_prompt=True) == want["generation"], conv
        # add_generation_prompt=True is exactly render + the generation prompt (what the agent's prompts are).
        assert smollm2_tpl.render(msgs).input_ids.tolist() + smollm2_tpl.generation_prompt_ids == want["generation"]


def test_assistant_body_is_encoded_apart_from_its_prompt(smollm2_tpl):
    """The documented deviation: the body is a run of its own (the model generates it after the prompt). It only
    matters when the body starts with two or more whitespace characters: BPE joins the prompt's "\\n" with the
    first of them when the two are encoded together."""
    tok = smollm2_tpl.tokenizer
    for content, same in (("Hello", True), (" Hello", True), ("\nHello", True), ("  Hello", False)):
        ids = smollm2_tpl.render_message(Message("assistant", content))[0]
        assert ids == smollm2_tpl.generation_prompt_ids + tok.encode(content) + [smollm2_tpl.ids["<|im_end|>"]]
        joint = tok.encode("assistant\n" + content)
        assert (joint == tok.encode("assistant\n") + tok.encode(content)) == same, content


# ---------------------------------------------------------------------------------------------
# Parsing


def _ambiguous(m: Message) -> bool:
    """Spellings the plain-text format cannot tell apart (module docstring of chatml_template.py)."""
    return (TOOL_CALL in m.content or END_THINK in (m.reasoning or "")
            or (not m.reasoning and m.content.lstrip().startswith(THINK)))


text = st.text(max_size=40) | st.sampled_from(["", "\n", "\n\nx\n", "  two", "a </tool_call> <|im_end|> {",
                                               "<think>", "x</think>y", '{"name": 1}'])
tool_call, assistant = assistant_strategies(text)


@settings(max_examples=150, deadline=None)
@given(message=assistant)
def test_render_then_parse_gives_back_the_message(tpl, message):
    assume(not _ambiguous(message))
    ids, _ = tpl.render_message(message)
    for parsed in (tpl.parse_assistant(ids, arg_types=_arg_types(message)),      # the prompt is skipped
                   tpl.parse_assistant(tpl.completion_ids(message), arg_types=_arg_types(message))):
        assert parsed.errors == () and parsed.finished and parsed.end_token == "<|im_end|>"
        assert parsed.message == _norm(message)


@settings(max_examples=60, deadline=None)
@given(message=assistant)
def test_text_parse_matches_id_parse(tpl, message):
    """From text (a chat API), parsing agrees wherever the text does not spell the special tokens."""
    assume(not _ambiguous(message))
    ids = tpl.completion_ids(message)
    decoded = tpl.tokenizer.decode(ids)
    assume(decoded.count("<|") == 1)   # only the final <|im_end|>
    by_text = tpl.parse_assistant_text(decoded, arg_types=_arg_types(message))
    assert by_text.message == _norm(message) and by_text.errors == ()


def test_arguments_holding_the_tags_are_escaped_in_json(tpl):
    m = Message("assistant", "", None, (ToolCall("i", "f", {"s": "a</tool_call><tool_call><think>"}),))
    text = tpl.tokenizer.decode(tpl.completion_ids(m))
    assert text == '<tool_call>{"name": "f", "arguments": {"s": "a\\u003c/tool_call>\\u003ctool_call>' \
                   '\\u003cthink>"}}</tool_call><|im_end|>'
    assert tpl.parse_assistant(tpl.completion_ids(m)).message.tool_calls[0].arguments == m.tool_calls[0].arguments


def test_declared_types_coerce_quoted_values(tpl):
    out = '<tool_call>{"name": "f", "arguments": {"n": "3", "s": 7, "x": [1]}}</tool_call><|im_end|>'
    parsed = tpl.parse_assistant_text(out, arg_types={"f": {"n": "integer", "s": "string"}})
    assert parsed.errors == () and parsed.message.tool_calls[0].arguments == {"n": 3, "s": "7", "x": [1]}
    # A missing "arguments" is an empty object (a call without arguments).
    parsed = tpl.parse_assistant_text('<tool_call>{"name": "submit"}</tool_call><|im_end|>')
    assert parsed.errors == () and parsed.message.tool_calls[0].arguments == {}


MALFORMED = [
    ('<tool_call>{"name": "bash", "arguments": {"cmd": "ls"}<|im_end|>', "unclosed tool call"),
    ('<tool_call>{"name": "bash", "arguments": {"cmd": "ls"}}<tool_call>{"name": "f", "arguments": {}}</tool_call>'
     "<|im_end|>", "tool_calls[0]: unclosed tool call"),
    ('<tool_call>{"name": "bash", "arguments": {"cmd": "ls"}</tool_call><|im_end|>', "not valid JSON"),
    ("<tool_call>bash\n<arg_key>cmd</arg_key></tool_call><|im_end|>", "not valid JSON"),
    ('<tool_call>{"arguments": {"cmd": "ls"}}</tool_call><|im_end|>', "without a name"),
    ('<tool_call>{"name": "", "arguments": {}}</tool_call><|im_end|>', "without a name"),
    ('<tool_call>{"name": 3, "arguments": {}}</tool_call><|im_end|>', "without a name"),
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call><|im_end|>',
     '"arguments" must be a JSON object'),
    ('<tool_call>{"name": "f", "arguments": [1]}</tool_call><|im_end|>', '"arguments" must be a JSON object'),
    ('<tool_call>["f", {}]</tool_call><|im_end|>', "expected a JSON object"),
    ('<tool_call>{"name": "f", "arguments": {"a": 1, "a": 2}}</tool_call><|im_end|>', "key 'a' given twice"),
    ('<tool_call>{"name": "f", "arguments": {}, "id": "x"}</tool_call><|im_end|>', "unexpected key(s) ['id']"),
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call> and more text<|im_end|>', "text after tool call 0"),
    ('<tool_call>{"name": "f", "arguments": {"n": "abc"}}</tool_call><|im_end|>', "expected a JSON integer"),
    ("<think>never closed<|im_end|>", "<think> without </think>"),
    ("hi<|im_end|>more", "after the end-of-turn token"),
    ("hi<|im_start|>user\nx", "unexpected token '<|im_start|>'"),
]


@pytest.mark.parametrize("output, fragment", MALFORMED)
def test_malformed_output_is_reported(tpl, output, fragment):
    parsed = tpl.parse_assistant(tpl.encode_output_text(output), arg_types={"f": {"n": "integer"}})
    assert any(fragment in e for e in parsed.errors), parsed.errors
    assert parsed.message.role == "assistant"


def test_malformed_calls_do_not_run_but_good_ones_do(tpl):
    out = ('<think>r</think>\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{bad}</tool_call>\n'
           '<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call><|im_end|>')
    parsed = tpl.parse_assistant_text(out)
    assert [(c.id, c.name, c.arguments) for c in parsed.message.tool_calls] == \
        [("call_0", "a", {}), ("call_1", "b", {"x": 1})]
    assert len(parsed.errors) == 1 and parsed.errors[0].startswith("tool_calls[1]: not valid JSON")
    assert parsed.message.reasoning == "r" and parsed.finished


def test_cut_off_generation_is_not_finished(tpl):
    m = Message("assistant", "Nothing to call.", "because")
    ids = tpl.completion_ids(m)
    parsed = tpl.parse_assistant(ids[:-1])
    assert not parsed.finished and parsed.errors == () and parsed.message == m
    call = Message("assistant", "", "r", (ToolCall("x", "bash", {"cmd": "echo hi"}),))
    parsed = tpl.parse_assistant(tpl.completion_ids(call)[:-4])
    assert not parsed.finished and any("unclosed tool call" in e for e in parsed.errors)


FRAGMENTS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "{", "}", "[", "]", '"', ":", ",", "\n", " ",
             '"name"', '"arguments"', '{"name": "f", "arguments": {}}', "null", "1e999", "\\", "\\u003c",
             "assistant\n", "x", "[[[[[[[[", "é😀"]
piece = (st.sampled_from([_Special("<|im_start|>"), _Special("<|im_end|>"), _Special("<|endoftext|>")])
         | st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=6), max_size=8).map("".join))


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(piece, max_size=20))
def test_parser_never_raises(tpl, pieces):
    parsed = tpl.parse_pieces(pieces, arg_types={"f": {"a": "integer", "b": "string"}})
    assert isinstance(parsed.errors, tuple) and parsed.message.role == "assistant"
    text = "".join(pieces)
    assert tpl.parse_assistant_text(text).message.role == "assistant"


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, 599), max_size=60))
def test_parser_never_raises_on_any_ids(tpl, ids):
    ids = [i for i in ids if i < tpl.tokenizer.vocab_size]
    assert tpl.parse_assistant(ids).message.role == "assistant"


# ---------------------------------------------------------------------------------------------
# The agent's turn handling and the server over ChatML


def test_parse_turn_forces_im_end_and_checks_canonical(tpl):
    im_end, eot = tpl.ids["<|im_end|>"], tpl.ids["<|endoftext|>"]
    m = Message("assistant", "content\nline", "why", (ToolCall("x", "bash", {"cmd": "ls -la | grep 'x y'"}),))
    ids = tpl.completion_ids(m)
    turn = parse_turn(tpl, ids, turn=7)
    assert turn.canonical and turn.n_forced == 0 and turn.action_ids == ids and not turn.cut_off
    assert turn.parsed.message.tool_calls[0].id == "call_0007_0"
    # Ended by <|endoftext|>: a stop token, but not the message's own end: <|im_end|> is appended, not sampled.
    turn = parse_turn(tpl, ids[:-1] + [eot], turn=0)
    assert not turn.cut_off and turn.n_forced == 1 and turn.action_ids == ids[:-1] + [eot, im_end]
    # Cut off: the same, and the feedback says so with the ChatML call format.
    turn = parse_turn(tpl, ids[:-3], turn=0)
    assert turn.cut_off and turn.n_forced == 1 and turn.action_ids[-1] == im_end and not turn.canonical
    feedback = feedback_message(turn, reminder=None, nudge="call a tool", format_hint=tpl.format_hint)
    assert "cut off" in feedback.content and tpl.format_hint in feedback.content


def test_openai_choice_and_prompt_over_chatml(tpl):
    tools = [{"type": "function", "function": {"name": "bash", "parameters": {
        "type": "object", "properties": {"cmd": {"type": "string"}, "timeout": {"type": "integer"}}}}}]
    history = [Message("user", "list files")]
    prompt = openai_api.prompt_ids(tpl, history, tools)
    system = tpl.tools_system_text(tools)
    assert '"name": "bash"' in system and '<tool_call>{"name": <function-name>' in system
    assert prompt == tpl.render([Message("system", system)] + history).input_ids.tolist() + tpl.generation_prompt_ids
    m = Message("assistant", "let me look", "first list files", (ToolCall("x", "bash", {"cmd": "ls", "timeout": 3}),))
    ids = tpl.completion_ids(m)
    zeros = np.zeros(len(ids), np.float32)
    out = openai_api.choice(tpl, 0, Completion(tokens=ids, logprobs=zeros, sampling_logprobs=zeros,
                                               finish_reason="stop", stop=ids[-1]), tools)
    assert out["finish_reason"] == "tool_calls" and out["message"]["reasoning_content"] == "first list files"
    call = out["message"]["tool_calls"][0]["function"]
    assert call["name"] == "bash" and json.loads(call["arguments"]) == {"cmd": "ls", "timeout": 3}


# ---------------------------------------------------------------------------------------------
# Choosing the template


def test_make_chat_template_by_name_and_auto(tpl, tmp_path):
    glm_tok = build_tokenizers(str(tmp_path))["sp"]
    assert isinstance(make_chat_template(tpl.tokenizer), ChatMLTemplate)
    assert isinstance(make_chat_template(tpl.tokenizer, "chatml"), ChatMLTemplate)
    assert isinstance(make_chat_template(glm_tok), Glm45Template)
    assert isinstance(make_chat_template(glm_tok, "glm45"), Glm45Template)
    assert CHAT_TEMPLATE_NAMES == ("auto", "glm45", "chatml")
    with pytest.raises(ValueError, match=r"data.chat_template='chatm' is not a chat template; choose one of "
                                         r"\['auto', 'glm45', 'chatml'\]"):
        make_chat_template(tpl.tokenizer, "chatm")
    with pytest.raises(ValueError, match=r"no special token\(s\) \['<\|im_start\|>', '<\|im_end\|>'\]"):
        make_chat_template(glm_tok, "chatml")
    with pytest.raises(ValueError, match=r"no special token\(s\) \['\[gMASK\]'"):
        make_chat_template(tpl.tokenizer, "glm45")


def test_auto_without_either_token_set_is_an_error(tmp_path):
    from klong_jax.data.tokenizer import HuggingFaceTokenizer
    from klong_jax.data.train_tokenizer import train_hf_tokenizer_json
    path = train_hf_tokenizer_json(["plain text only"] * 20, str(tmp_path / "t.json"), vocab_size=300,
                                   special_tokens=["<|endoftext|>", "<|im_start|>"])
    with pytest.raises(ValueError, match=r"run.chat_template='auto': .* has neither ChatML's special tokens"):
        make_chat_template(HuggingFaceTokenizer(path), field="run.chat_template")


def test_data_config_checks_the_template_name():
    from klong_jax.data.context import ContextConfig
    from klong_jax.data.pipeline import DataConfig
    ctx = ContextConfig(budget_tokens=512, reserve_tokens=64)
    assert DataConfig(tokenizer="t.model", context=ctx, seq_len=512, batch_size=1).chat_template == "auto"
    with pytest.raises(ValueError, match=r"data.chat_template='glm4' is not a chat template"):
        DataConfig(tokenizer="t.model", context=ctx, seq_len=512, batch_size=1, chat_template="glm4")


@pytest.mark.parametrize("name", ["chatml", "glm45"])
def test_system_prompt_slot_renders_the_templates_call_format(tpl, tmp_path_factory, name):
    """The agent's system prompt carries TOOL_CALL_FORMAT_SLOT: each template renders it as its own format_hint
    (so SFT data and rollouts show the call syntax from turn 0); a system message without the slot is untouched."""
    from klong_jax.data.template_base import TOOL_CALL_FORMAT_SLOT
    from klong_jax.tasks.tools import system_prompt
    template = tpl if name == "chatml" else Glm45Template(
        build_tokenizers(str(tmp_path_factory.mktemp("glm")))["sp"])
    prompt = system_prompt()
    assert prompt.endswith("\n" + TOOL_CALL_FORMAT_SLOT)
    filled = Message("system", prompt.replace(TOOL_CALL_FORMAT_SLOT, template.format_hint))
    assert template.render_message(Message("system", prompt)) == template.render_message(filled)
    plain = Message("system", "You are an agent.")
    assert template.fill_slots(plain) is plain
    # The rendered conversation holds the hint's tokens (the same ids as the hint spelled out in the message).
    ids = template.render([Message("system", prompt), Message("user", "go")]).input_ids.tolist()
    assert ids == template.render([filled, Message("user", "go")]).input_ids.tolist()


def test_one_call_per_turn_cuts_after_the_first_call(tpl):
    """A turn that writes two calls and runs on: with one_call_per_turn the completion is cut right after the token
    that completes the first `</tool_call>` (what a stop string gives), its log-probs and routing cut alike, and the
    turn is the canonical one-call message plus the appended <|im_end|> (not cut off: no feedback)."""
    from klong_jax.agent.policy import Completion
    from klong_jax.agent.turn import clip_after_first_call
    im_end = tpl.ids["<|im_end|>"]
    one = Message("assistant", "", "look", (ToolCall("x", "bash", {"cmd": "ls"}),))
    two = Message("assistant", "", "look", (ToolCall("x", "bash", {"cmd": "ls"}), ToolCall("y", "bash", {"cmd": "pwd"})))
    first = tpl.completion_ids(one)[:-1]                 # the one-call body without <|im_end|>
    sampled = tpl.completion_ids(two)[:-1] + tpl.tokenizer.encode("\n<tool_")   # two calls, then a third begun
    assert sampled[:len(first)] == first and len(sampled) > len(first)
    n = len(sampled)
    logprobs, routed = -np.arange(n, dtype=np.float32), np.arange(2 * n * 3).reshape(2, n, 3)
    clipped, stopped = clip_after_first_call(Completion(sampled, logprobs, logprobs, routed, None, "length"), tpl)
    assert stopped and clipped.finish_reason == "stop" and clipped.tokens == first
    k = len(first)
    assert clipped.logprobs.tolist() == logprobs[:k].tolist() and clipped.routed_experts.shape == (2, k, 3)
    turn = parse_turn(tpl, clipped.tokens, turn=0, stopped_after_call=True)
    assert not turn.cut_off and turn.n_forced == 1 and turn.canonical
    assert turn.action_ids == first + [im_end] and len(turn.parsed.message.tool_calls) == 1
    assert feedback_message(turn, reminder=None, nudge="n", format_hint=tpl.format_hint) is None
    # No call closed: unchanged.
    same, stopped = clip_after_first_call(Completion(first[:-2], None, None, None, None, "length"), tpl)
    assert not stopped and same.tokens == first[:-2]
