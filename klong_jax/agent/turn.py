"""One assistant turn: parse the sampled ids, run the tool calls, and write what the model sees next.

Parsing never raises on model output (`ChatTemplate.parse_assistant`): the complete tool calls of a
turn run; everything malformed in it (an unclosed call, a stray tag, an argument of the wrong type)
is told to the model in a user message after the tool results, with the template's `format_hint`, as
is a turn without any tool call (the nudge) and, every few turns, the elapsed time.

The turn's ids in the context are exactly the sampled ids, plus one appended token when they do
not end with the message's own end-of-turn token (`template.end_of_turn_id(message)`; `n_forced` = 1):
a turn cut off at its token limit, or one that ended with another stop token (GLM: `<|user|>` after a
tool call, `<|observation|>` without one; ChatML: `<|endoftext|>` instead of `<|im_end|>`). The template
renders the next message after that token (GLM: tool results after `<|observation|>`, a user message
after `<|user|>`; ChatML: `\n<|im_start|>` and the next role), so the context stays well formed. The
appended token was not sampled: it carries no log-prob and no loss.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from klong_jax.agent.policy import Completion
from klong_jax.data.template_base import ChatTemplate, ParsedAssistant
from klong_jax.data.trajectory import Message
from klong_jax.sampling.stops import find_stop_string
from klong_jax.tasks.tools import TOOL_SPECS, ToolResult

# tool -> argument -> JSON type, from the tool specs ("integer (from 1)" -> "integer").
ARG_TYPES = {spec["name"]: {key: kind.split()[0] for key, kind in spec["parameters"].items()}
             for spec in TOOL_SPECS}



@dataclass(frozen=True)
class ParsedTurn:
    parsed: ParsedAssistant
    action_ids: list[int]     # what the context holds after the generation prompt: sampled (+ forced)
    n_forced: int             # appended end-of-turn tokens (0 or 1)
    canonical: bool           # action_ids == the template's rendering of the parsed message
    cut_off: bool             # sampling stopped before any end-of-turn token (the token limit)


def clip_after_first_call(completion: Completion, template: ChatTemplate) -> tuple[Completion, bool]:
    """(the completion cut right after the token that completes its first `template.call_end_text`, True), or
    (the completion unchanged, False) when it closes no call. Cutting there is what sampling with that text as a
    stop string gives (sampling is autoregressive: the kept prefix is a sample under that rule), so the kept
    tokens keep their log-probs and routing; finish_reason becomes "stop". A completion holding ids outside the
    tokenizer's vocabulary (no text) is left unchanged."""
    tokens = [int(t) for t in completion.tokens]
    if template.call_end_text is None:
        raise ValueError(f"agent.one_call_per_turn: the {template.name} template closes tool calls with a special "
                         "token, not text; set agent.one_call_per_turn=False")
    if any(not 0 <= t < template.tokenizer.vocab_size for t in tokens):
        return completion, False
    hit = find_stop_string(template.tokenizer, tokens, (template.call_end_text,))
    if hit is None:
        return completion, False
    n = hit[0]

    def cut(values):   # [n] log-probs
        return None if values is None else np.asarray(values)[:n]

    routed = None if completion.routed_experts is None else np.asarray(completion.routed_experts)[:, :n]
    return Completion(tokens[:n], cut(completion.logprobs), cut(completion.sampling_logprobs), routed,
                      completion.prompt_routed_experts, "stop"), True


def parse_turn(template: ChatTemplate, sampled_ids: Sequence[int], turn: int, *,
               stopped_after_call: bool = False) -> ParsedTurn:
    """Parses one sampled assistant message; call ids are unique within the episode.
    stopped_after_call: sampling ended right after a complete tool call (clip_after_first_call): the turn ended
    as asked, it is not cut off (its end-of-turn token is appended all the same)."""
    sampled = [int(i) for i in sampled_ids]
    # A model's vocabulary may be padded past the tokenizer's: such ids have no text. They are
    # left out of the parse (and reported), never out of the context.
    vocab = template.tokenizer.vocab_size
    known = [i for i in sampled if 0 <= i < vocab]
    parsed = template.parse_assistant(known, arg_types=ARG_TYPES,
                                      call_id=lambda k: f"call_{turn:04d}_{k}")
    if len(known) < len(sampled):
        unknown = sorted(set(sampled) - set(known))
        parsed = dataclasses.replace(parsed, errors=parsed.errors + (
            f"{len(sampled) - len(known)} token(s) outside the tokenizer's vocabulary of {vocab} "
            f"(ids {unknown[:5]})",))
    # Whether the turn ended is what was sampled, not what parsed: a stray tag before the end
    # token stops the parser early, yet the turn is closed.
    cut_off = not stopped_after_call and (not sampled or sampled[-1] not in template.stop_ids)
    expected = template.end_of_turn_id(parsed.message)
    action = list(sampled)
    n_forced = 0
    if not sampled or sampled[-1] != expected:
        action.append(expected)
        n_forced = 1
    return ParsedTurn(parsed, action, n_forced, template.completion_ids(parsed.message) == action, cut_off)


def feedback_message(turn: ParsedTurn, *, reminder: str | None, nudge: str,
                     format_hint: str) -> Message | None:
    """The user message after the tool results: format errors (with the template's `format_hint`),
    the nudge (with the hint too when the turn called no tool), the time reminder."""
    parsed = turn.parsed
    parts = []
    if turn.cut_off:
        parts.append("Your last message was cut off at its token limit; keep messages shorter.")
    if parsed.errors:
        listed = "\n".join(f"- {e}" for e in parsed.errors)
        parts.append(f"Your last message was malformed:\n{listed}\n{format_hint}")
    if not parsed.message.tool_calls:
        # A turn with no call at all may not know the syntax: say it (once, when no error above already did).
        parts.append(nudge if parsed.errors else f"{nudge}\n{format_hint}")
    if reminder:
        parts.append(reminder)
    return Message("user", "\n\n".join(parts)) if parts else None


def run_calls(parsed: ParsedAssistant, run: Callable[[str, dict], ToolResult],
              time_left: Callable[[], float], submit_refused: str | None = None
              ) -> tuple[list[Message], bool, bool]:
    """Runs the turn's tool calls in order: (tool messages, submitted, out of time). Calls after a
    submit or after the time limit are answered without running, so every call has its result.
    submit_refused: when set, a `submit` call is answered with this text instead of running, and the
    episode goes on (AgentConfig.submit_ends_episode=False)."""
    messages: list[Message] = []
    submitted = out_of_time = False
    for call in parsed.message.tool_calls:
        if submitted:
            text = "Error: not run: submit ended the episode."
        elif time_left() <= 0:
            out_of_time = True
            text = "Error: not run: the episode's time limit was reached."
        elif submit_refused is not None and call.name == "submit":
            text = submit_refused
        else:
            result = run(call.name, call.arguments)
            submitted = result.submitted
            text = result.observation
        messages.append(Message("tool", text, tool_call_id=call.id))
    return messages, submitted, out_of_time or time_left() <= 0


def reminder_text(turn: int, elapsed_s: float, timeout_s: float, max_turns: int) -> str:
    return (f"[Time: {_clock(elapsed_s)} of {_clock(timeout_s)} used "
            f"({_clock(max(timeout_s - elapsed_s, 0.0))} left); turn {turn + 1} of {max_turns}.]")


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
