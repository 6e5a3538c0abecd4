"""The chat-template interface: what the ContextPolicy, the splitter, the agent, the server and RL use.

A template turns messages into token ids with, per token, a role, a message index, a turn index and
whether the model generates it (`Rendered`), and parses generated ids back into a message
(`ParsedAssistant`). Every implementation keeps this contract, so the ContextPolicy and the splitter
work unchanged on any of them:

- An assistant message renders as `generation_prompt_ids` (given to the model, not trainable) followed
  by the generated part: its body and its end-of-turn token (trainable). Nothing follows the end of
  turn inside the assistant message: whatever separates it from the next message belongs to that
  next message. So a sampler that stops at a stop id has produced exactly the generated part, and
  `prompt + generated` is the message as `render_message` writes it (`completion_ids`).
- `render(messages)` is `format_prefix_ids`, then what the template itself inserts before the first
  message (role "format", message index -1: GLM's nothing, ChatML's default system message), then
  `render_message(m, prev)` for each message in order: it is compositional, so token counts add up.
- Roles are ROLE_CODES of the message each token belongs to; the turn index is -1 for the prefix (the
  messages before the first assistant message) and k for turn k (assistant message k and the messages
  after it up to the next assistant message).
- Parsing never raises on model output: everything malformed is listed in `errors`.
"""
from __future__ import annotations

import abc
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from klong_jax.data.tokenizer import Tokenizer
from klong_jax.data.trajectory import Message, split_turns

ROLE_CODES = {"format": 0, "system": 1, "user": 2, "assistant": 3, "tool": 4}

# tool name -> argument name -> JSON-schema type ("string", "integer", "number", "boolean", ...)
ArgTypes = Mapping[str, Mapping[str, str]]
CallId = Callable[[int], str]


# A system message may hold this slot; every template renders it as its own `format_hint` (how a tool call is
# written in that format), as Hugging Face templates render a `tools=` argument into the system message. The
# agent's system prompt (klong_jax.tasks.tools.system_prompt) has it, so the expert data and the agent's rollouts
# show the model the call syntax of whichever template renders them, from the first turn on.
TOOL_CALL_FORMAT_SLOT = "{tool_call_format}"


def default_call_id(k: int) -> str:
    return f"call_{k}"


class _Special(str):
    """A template token inside a piece list (plain str pieces are text)."""


@dataclass(frozen=True)
class Rendered:
    """A rendered message sequence; every array is [L]."""
    input_ids: np.ndarray      # int32
    roles: np.ndarray          # int8, ROLE_CODES (the end-of-turn token belongs to its assistant turn)
    message_index: np.ndarray  # int32, -1 for format tokens (format prefix, template-inserted text)
    turn_index: np.ndarray     # int32, -1 for the prefix, k for turn k (assistant + its observations)
    trainable: np.ndarray      # bool, tokens the model generates: assistant body and end of turn

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class ParsedAssistant:
    """The parse of one generated assistant turn; `errors` lists everything malformed in it."""
    message: Message
    errors: tuple[str, ...]
    finished: bool            # ended with an end-of-turn token (False: cut off at max_new_tokens)
    end_token: str | None


class ChatTemplate(abc.ABC):
    """A chat format over one tokenizer. Implementations: Glm45Template ("glm45"), ChatMLTemplate
    ("chatml"); `klong_jax.data.chat_template.make_chat_template` picks one by name or from the tokenizer.

    Attributes every implementation sets in its constructor:
      tokenizer              the Tokenizer
      stop_ids               ids that end a generated assistant turn (the sampler's stop tokens)
      format_prefix_ids      what every sequence starts with ([gMASK]<sop> for GLM, nothing for ChatML)
      generation_prompt_ids  what the model is given before it writes an assistant message
      format_hint            one paragraph telling the model how a tool call is written (agent feedback)
    Class attribute: call_end_text, the text that closes a tool call when calls are plain text (ChatML's
      `</tool_call>`), None when the template closes them with a special token (the agent's
      one_call_per_turn needs it).
      _special_by_id         id -> template token string, for the ids that split output into pieces
      _text_split_re         the regex of those template tokens spelled as text
    """
    name: ClassVar[str]
    call_end_text: ClassVar[str | None] = None
    tokenizer: Tokenizer
    stop_ids: tuple[int, ...]
    format_prefix_ids: list[int]
    generation_prompt_ids: list[int]
    format_hint: str
    _special_by_id: dict[int, str]
    _text_split_re: re.Pattern

    # ------------------------------------------------------------------------------------------
    # Rendering

    @abc.abstractmethod
    def render_message(self, message: Message, prev: Message | None = None
                       ) -> tuple[list[int], list[bool]]:
        """(ids, trainable) of one message; `prev` is the message before it (None at the start).
        An assistant message is `generation_prompt_ids` + body + end-of-turn id whatever `prev` is."""

    @abc.abstractmethod
    def end_of_turn_id(self, message: Message) -> int:
        """The id that ends this assistant message when rendered (its last token)."""

    def fill_slots(self, message: Message) -> Message:
        """The message as rendered: a system message's TOOL_CALL_FORMAT_SLOT replaced by `format_hint`."""
        if message.role == "system" and TOOL_CALL_FORMAT_SLOT in message.content:
            return dataclasses.replace(message, content=message.content.replace(TOOL_CALL_FORMAT_SLOT,
                                                                                self.format_hint))
        return message

    def _opening(self, messages: Sequence[Message]) -> tuple[list[int], Message | None]:
        """Ids the template inserts before the first message (after the format prefix), and the message
        they stand for (the `prev` of the first message). Default: nothing."""
        return [], None

    def render(self, messages: Sequence[Message], *, format_prefix: bool = True) -> Rendered:
        """The whole conversation, as plain (unsplit) SFT tokenisation would see it. format_prefix=False:
        the messages alone, one `render_message` after another (no format prefix, no opening)."""
        prefix, turns = split_turns(messages)
        turn_of = [-1] * len(prefix)
        for k, turn in enumerate(turns):
            turn_of += [k] * (1 + len(turn.observations))
        ids: list[int] = list(self.format_prefix_ids) if format_prefix else []
        prev = None
        if format_prefix:
            opening, prev = self._opening(messages)
            ids += opening
        n0 = len(ids)
        roles = [ROLE_CODES["format"]] * n0
        msg_idx, turn_idx, trainable = [-1] * n0, [-1] * n0, [False] * n0
        for i, m in enumerate(messages):
            m_ids, m_train = self.render_message(m, prev)
            ids += m_ids
            trainable += m_train
            roles += [ROLE_CODES[m.role]] * len(m_ids)
            msg_idx += [i] * len(m_ids)
            turn_idx += [turn_of[i]] * len(m_ids)
            prev = m
        return Rendered(np.asarray(ids, np.int32), np.asarray(roles, np.int8),
                        np.asarray(msg_idx, np.int32), np.asarray(turn_idx, np.int32),
                        np.asarray(trainable, bool))

    def conversation_ids(self, messages: Sequence[Message], *, add_generation_prompt: bool = False
                         ) -> list[int]:
        """The conversation as the model's own chat template writes it (what Hugging Face's
        `apply_chat_template(messages, tokenize=True, add_generation_prompt=...)` gives): `render` plus
        the generation prompt, or plus whatever the format closes a conversation with."""
        ids = self.render(messages).input_ids.tolist()
        return ids + list(self.generation_prompt_ids) if add_generation_prompt else ids

    def completion_ids(self, message: Message) -> list[int]:
        """What the model generates for an assistant message: its rendering after the generation
        prompt, the end-of-turn id included."""
        ids, _ = self.render_message(message, None)
        return ids[len(self.generation_prompt_ids):]

    def assistant_ids(self, action_ids: Sequence[int]) -> tuple[list[int], list[bool]]:
        """(ids, trainable) of an assistant message whose generated part is `action_ids`:
        the generation prompt (not trainable), then the action (trainable)."""
        prompt = list(self.generation_prompt_ids)
        action = [int(i) for i in action_ids]
        return prompt + action, [False] * len(prompt) + [True] * len(action)

    # ------------------------------------------------------------------------------------------
    # Pieces: template tokens (_Special) and text runs

    def pieces_from_ids(self, ids: Sequence[int]) -> list[str]:
        """Template tokens (_Special: the ids in `_special_by_id`) and decoded text runs of a token sequence."""
        pieces: list[str] = []
        run: list[int] = []
        for i in ids:
            tag = self._special_by_id.get(int(i))
            if tag is None:
                run.append(int(i))
                continue
            if run:
                pieces.append(self.tokenizer.decode(run))
                run = []
            pieces.append(_Special(tag))
        if run:
            pieces.append(self.tokenizer.decode(run))
        return pieces

    def pieces_from_text(self, text: str) -> list[str]:
        """Template tokens (matches of `_text_split_re`) and text of a decoded string (from an API that returns
        text, not ids)."""
        pieces: list[str] = []
        pos = 0
        for m in self._text_split_re.finditer(text):
            if m.start() > pos:
                pieces.append(text[pos:m.start()])
            pieces.append(_Special(m.group()))
            pos = m.end()
        if pos < len(text):
            pieces.append(text[pos:])
        return pieces

    @abc.abstractmethod
    def encode_pieces(self, pieces: Sequence[str]) -> list[int]:
        """Ids of pieces: a _Special as its template id, text runs encoded (adjacent text together)."""

    def encode_output_text(self, text: str) -> list[int]:
        """Ids of raw model output written as text (template tokens spelled out): what a model that
        wrote this text generated. Used to replay malformed turns."""
        return self.encode_pieces(self.pieces_from_text(text))

    # ------------------------------------------------------------------------------------------
    # Parsing generated output

    @abc.abstractmethod
    def parse_pieces(self, pieces: Sequence[str], *, arg_types: ArgTypes | None = None,
                     call_id: CallId = default_call_id) -> ParsedAssistant:
        """Parses the pieces of one generated assistant message. Never raises."""

    def parse_assistant(self, ids: Sequence[int], *, arg_types: ArgTypes | None = None,
                        call_id: CallId = default_call_id) -> ParsedAssistant:
        """Parses generated ids (after the generation prompt; a leading prompt is skipped).
        Never raises on model output: problems are listed in `errors`. `arg_types` decodes argument
        values by their declared JSON type; `call_id(k)` names the k-th call."""
        return self.parse_pieces(self.pieces_from_ids(ids), arg_types=arg_types, call_id=call_id)

    def parse_assistant_text(self, text: str, *, arg_types: ArgTypes | None = None,
                             call_id: CallId = default_call_id) -> ParsedAssistant:
        """`parse_assistant` of decoded text (template tokens spelled out)."""
        return self.parse_pieces(self.pieces_from_text(text), arg_types=arg_types, call_id=call_id)

    # ------------------------------------------------------------------------------------------
    # Tools

    @abc.abstractmethod
    def tools_system_text(self, tools: Sequence[dict]) -> str:
        """A system message describing OpenAI-style tool schemas and this format's call syntax."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.tokenizer!r})"
