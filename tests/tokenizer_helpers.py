"""Shared by the GGUF tokenizer and ChatML template tests: a tiny byte-level BPE GGUF written here, a small ChatML
tokenizer trained here, the real SmolLM2 file (skipped when it is not cached), and the transformers reference
(tools/tokenizer_reference.py in $KLONG_HF_PYTHON), run once per session for the real file's mixed corpus."""
import dataclasses
import functools
import json
import os
import subprocess
import tempfile

import pytest
from hypothesis import strategies as st

from klong_jax.data.trajectory import Message, ToolCall

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_PYTHON = os.environ.get("KLONG_HF_PYTHON")   # a Python with transformers + gguf (see .ci/run)
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# ---------------------------------------------------------------------------------------------
# A tiny GGUF tokenizer: 4 control tokens, the 256 byte-alphabet characters, 9 merge results, a token spelled
# with real spaces (respelled to the byte alphabet) and a user-defined token.

TINY_CONTROLS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<ctrl x>"]   # the last: a mislabel (has a space)
TINY_MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"),
               ("l", "d"), ("Ġwor", "ld"), ("Ġ", "Ġ")]
TINY_CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                      "{{ '<|im_start|>system\\nYou are tiny.<|im_end|>\\n' }}{% endif %}"
                      "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                      "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tiny_tokens() -> tuple[list[str], list[int]]:
    """(tokens, token types) of the tiny GGUF; ids are positions."""
    from klong_jax.data.tokenizer import byte_alphabet
    alphabet = byte_alphabet()
    tokens = TINY_CONTROLS + [alphabet[b] for b in range(256)] + [a + b for a, b in TINY_MERGES[:-1]] + \
        ["  ", "<think>"]
    types = [3] * len(TINY_CONTROLS) + [1] * (256 + len(TINY_MERGES) - 1) + [1, 4]
    return tokens, types


def write_tiny_gguf(path: str, *, model: str = "gpt2", pre: str = "smollm", merges: bool = True,
                    chat_template: str | None = TINY_CHAT_TEMPLATE) -> str:
    """Writes a GGUF holding only tokenizer metadata (no tensors) with gguf.GGUFWriter."""
    import gguf
    tokens, types = tiny_tokens()
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges([f"{a} {b}" for a, b in TINY_MERGES])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------------------------------------
# A small ChatML tokenizer.json trained on the synthetic corpus (a stand-in for SmolLM2's when the file is absent)


def chatml_tokenizer(directory: str, *, vocab_size: int = 600):
    from klong_jax.data.synthetic import synthetic_corpus, texts_of
    from klong_jax.data.tokenizer import HuggingFaceTokenizer
    from klong_jax.data.train_tokenizer import train_hf_tokenizer_json
    path = train_hf_tokenizer_json(list(texts_of(synthetic_corpus(20, seed=0))), os.path.join(directory, "chatml.json"),
                                   vocab_size=vocab_size, special_tokens=CHATML_SPECIALS)
    return HuggingFaceTokenizer(path)


# ---------------------------------------------------------------------------------------------
# The real file and the reference


def smollm2_path() -> str:
    """The cached SmolLM2-135M-Instruct GGUF, or a skip saying how to get it."""
    from klong_jax.hf.pretrained import local_path
    path = local_path("smollm2-135m-instruct")
    if not os.path.isfile(path):
        pytest.skip(f"{path} is not cached: run `python -c \"from klong_jax.hf.pretrained import fetch; fetch()\"`")
    return path


def need_hf_python():
    if not HF_PYTHON:
        pytest.skip("KLONG_HF_PYTHON is not set (a Python with transformers + gguf; see .ci/run)")


def run_reference(gguf_path: str, texts, conversations) -> dict:
    """tools/tokenizer_reference.py's answer for this file and request (see its docstring)."""
    need_hf_python()
    with tempfile.TemporaryDirectory() as d:
        req, out = os.path.join(d, "request.json"), os.path.join(d, "out.json")
        with open(req, "w", encoding="utf-8") as f:
            json.dump({"texts": list(texts), "conversations": [list(c) for c in conversations]}, f)
        run = subprocess.run([HF_PYTHON, os.path.join(ROOT, "tools", "tokenizer_reference.py"), gguf_path, req, out],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        with open(out, encoding="utf-8") as f:
            return json.load(f)


# A mixed corpus: code with indentation and tabs, unicode (CJK, emoji incl. ZWJ sequences and flags, combining
# marks, RTL), digits, whitespace runs, newlines, and the special-token strings of ChatML and GLM.
MIXED_CORPUS = [
    "",
    "hello world",
    "def f(x):\n    if x > 0:\n\treturn x ** 2  # tab-indented\n    return -x\n\n\nclass A:\n        pass\n",
    "    leading spaces and trailing   ",
    "\t\ttabs\tbetween\t\t",
    "line1\nline2\r\nline3\n\n\n\nend\n",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 😀🎉 family 👨‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0335\u0321a\u0334l\u0337g\u0336o",
    "RTL: مرحبا بالعالم שלום",
    "digits 0123456789 3.14159 1e-10 -42 1,000,000 2024-12-06 0x1F",
    "many     spaces\n \n  \n   x",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "quoted <|im_end|> inside text and <think>reasoning</think> and <tool_call>{\"name\": \"f\"}</tool_call>",
    "[gMASK]<sop><|system|><|user|><|assistant|><|observation|>",
    "json: {\"name\": \"bash\", \"arguments\": {\"cmd\": \"ls -la | grep 'x y'\"}}",
    "url https://example.com/a?b=c&d=e#f and path C:\\Users\\x\\file.txt",
    "I'm sure it's fine, we'll see; they've done what you'd do.",
    "\u00a0non-breaking\u2003em space\u200bzero width",
    "x" * 300,
    "bytes the SmolLM2 vocabulary lacks: \x04 \x16 \U00040000 (dropped by both)",
]

# Plain conversations (no tools, no reasoning), some with a system message and some without (the template's
# default system line), multi-turn, unicode and code.
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "Another?"}],
    [{"role": "system", "content": "Answer in code."},
     {"role": "user", "content": "Write f(x) returning x squared.\n\tKeep it short."},
     {"role": "assistant", "content": "def f(x):\n    return x * x\n"},
     {"role": "user", "content": "日本語で説明して 😀"}, {"role": "assistant", "content": "二乗を返します。"}],
    [{"role": "user", "content": "multi\n\nline\n"}, {"role": "assistant", "content": "ok\n"},
     {"role": "user", "content": "  indented question"}],
]


@functools.lru_cache(maxsize=None)
def smollm2_reference() -> dict:
    """The reference for the real file, the mixed corpus and the conversations (one subprocess per session)."""
    return run_reference(smollm2_path(), MIXED_CORPUS, CONVERSATIONS)


# One conversation with reasoning, two tool calls, two results, a plain answer and a final call: rendered by
# both templates' tests (GLM-4.5 and ChatML).
CONVERSATION = [
    Message("system", "You are an agent."),
    Message("user", "Reproduce the paper."),
    Message("assistant", "Let me look.", "List files first.",
            (ToolCall("c1", "bash", {"cmd": "ls -la", "timeout": 30}),
             ToolCall("c2", "read_file_chunk", {"file": "p.md", "flags": ["a", 1]}))),
    Message("tool", "a.py\nb.py", tool_call_id="c1"),
    Message("tool", "# Title", tool_call_id="c2"),
    Message("assistant", "Nothing to call."),
    Message("user", "Continue."),
    Message("assistant", "", None, (ToolCall("c3", "submit", {"end_message": "done"}),)),
]


def assistant_strategies(text):
    """Hypothesis strategies (tool call, assistant message) over the given text strategy: names, JSON argument
    values nested up to 6 leaves, up to 3 calls; both templates' round-trip and fuzz tests draw from them."""
    ident = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True)
    json_value = st.recursive(
        st.none() | st.booleans() | st.integers(-10**6, 10**6)
        | st.floats(allow_nan=False, allow_infinity=False) | text,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ident, inner, max_size=3),
        max_leaves=6)
    tool_call = st.builds(ToolCall, id=st.just("x"), name=ident,
                          arguments=st.dictionaries(ident, json_value, max_size=4))
    assistant = st.builds(Message, role=st.just("assistant"), content=text,
                          reasoning=st.none() | text, tool_calls=st.lists(tool_call, max_size=3).map(tuple))
    return tool_call, assistant


def normalised(m: Message) -> Message:
    """m as a parse gives it back: call ids call_0.. in order, empty reasoning as None."""
    calls = tuple(dataclasses.replace(c, id=f"call_{k}") for k, c in enumerate(m.tool_calls))
    return dataclasses.replace(m, reasoning=m.reasoning or None, tool_calls=calls)


def arg_types_of(m: Message) -> dict:
    """tool name -> argument name -> the JSON-schema type of m's own argument values (parse hints)."""
    kinds = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array",
             dict: "object", type(None): "null"}
    return {c.name: {k: kinds[type(v)] for k, v in c.arguments.items()} for c in m.tool_calls}
