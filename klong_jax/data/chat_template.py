"""Chat templates: the interface and its two formats, chosen by name or from the tokenizer.

    template = make_chat_template(tokenizer, config.data.chat_template)   # "auto" | "glm45" | "chatml"

- `ChatTemplate` (template_base.py): the interface every caller uses (`render`, `render_message`,
  `parse_assistant`, `stop_ids`, `generation_prompt_ids`, ...) and its per-token contract (`Rendered`).
- `Glm45Template` (glm45_template.py): GLM-4.5, every tag a special token:
      [gMASK]<sop><|system|>\\n{system}<|user|>\\n{task}<|assistant|>\\n<think>{reasoning}</think>\\n{content}
      \\n<tool_call>{name}\\n<arg_key>{k}</arg_key>\\n<arg_value>{v}</arg_value>\\n</tool_call><|observation|>...
- `ChatMLTemplate` (chatml_template.py): ChatML (SmolLM2, Qwen), reasoning and JSON tool calls as text:
      <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{task}<|im_end|>\\n<|im_start|>assistant\\n
      <think>{reasoning}</think>\\n{content}\\n<tool_call>{"name": ..., "arguments": {...}}</tool_call><|im_end|>...

"auto" picks chatml when the tokenizer has `<|im_start|>` and `<|im_end|>` as special tokens, glm45 when it
has all of GLM-4.5's template tokens, and is an error otherwise (or when it has both).
"""
from __future__ import annotations

from klong_jax.data.chatml_template import CHATML_TOKENS, ChatMLTemplate, default_system_message
from klong_jax.data.glm45_template import (ASSISTANT, GLM45_SPECIAL_TOKENS, OBSERVATION,  # noqa: F401
                                           STOP_TOKENS, TEMPLATE_TOKENS, USER, Glm45Template, encode_argument,
                                           end_of_turn_token, parse_pieces)
from klong_jax.data.template_base import (ROLE_CODES, ArgTypes, ChatTemplate, ParsedAssistant,  # noqa: F401
                                          Rendered, _Special)
from klong_jax.data.tokenizer import Tokenizer

CHAT_TEMPLATES = {"glm45": Glm45Template, "chatml": ChatMLTemplate}
CHAT_TEMPLATE_NAMES = ("auto",) + tuple(CHAT_TEMPLATES)


def check_chat_template_name(name, field: str = "data.chat_template") -> str:
    """`name` when it is one of CHAT_TEMPLATE_NAMES; else a ValueError naming `field` and the choices."""
    if name not in CHAT_TEMPLATE_NAMES:
        raise ValueError(f"{field}={name!r} is not a chat template; choose one of {list(CHAT_TEMPLATE_NAMES)}")
    return name


def detect_chat_template(tokenizer: Tokenizer, field: str = "data.chat_template") -> str:
    """The template a tokenizer's special tokens call for: "chatml" or "glm45" (ValueError otherwise)."""
    chatml = all(tokenizer.special_id(t) is not None for t in CHATML_TOKENS)
    missing_glm = [t for t in TEMPLATE_TOKENS if tokenizer.special_id(t) is None]
    if chatml and not missing_glm:
        raise ValueError(f"{tokenizer!r} has the special tokens of both ChatML and GLM-4.5: set {field} to "
                         "'chatml' or 'glm45'")
    if chatml:
        return "chatml"
    if not missing_glm:
        return "glm45"
    raise ValueError(f"{field}='auto': {tokenizer!r} has neither ChatML's special tokens {list(CHATML_TOKENS)} "
                     f"nor all of GLM-4.5's (missing {missing_glm}); use a tokenizer with one of these sets, or "
                     f"name the template ({list(CHAT_TEMPLATES)}) to see which tokens it needs")


def make_chat_template(tokenizer: Tokenizer, name: str = "auto", *,
                       field: str = "data.chat_template") -> ChatTemplate:
    """The chat template `name` ("auto", "glm45", "chatml") over `tokenizer`; `field` is the config field
    the name came from, for error messages."""
    name = check_chat_template_name(name, field)
    if name == "auto":
        name = detect_chat_template(tokenizer, field)
    return CHAT_TEMPLATES[name](tokenizer)


__all__ = ["CHAT_TEMPLATES", "CHAT_TEMPLATE_NAMES", "ChatMLTemplate", "ChatTemplate", "Glm45Template",
           "ParsedAssistant", "ROLE_CODES", "Rendered", "check_chat_template_name", "default_system_message",
           "detect_chat_template", "make_chat_template"]
