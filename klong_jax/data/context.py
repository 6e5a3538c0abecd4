"""ContextPolicy: what the model sees when it writes turn j. One object for inference and training.

The context for turn j is `prefix + turns[s..j-1] + generation prompt` (klong_method.md; the prompt is
the template's `generation_prompt_ids`: GLM's `<|assistant|>`, ChatML's `\n<|im_start|>assistant\n`).
The prefix is the template's format prefix (GLM's `[gMASK]<sop>`) and every message before the first
assistant message (the system messages and the task). A turn is an assistant message and the messages
answering it (tool results, nudges). Any chat template works (template_base.py's contract).

Rules, all exact in tokens of the chat template:
- Fit: the start s is kept while `P + H(s, j) + need <= C`, with P the prefix tokens, H the tokens of
  turns s..j-1 and need = max(reserve_tokens, tokens of turn j's assistant message when known). The
  agent does not know the next message, so it asks with the reserve and generates at most
  `C - P - H - g` tokens (g: the generation prompt's length); the splitter knows it. For an episode
  this policy produced, both give the same starts, so replaying a recorded rollout reproduces the
  agent's contexts exactly.
- Drop: while it does not fit, s advances by the oldest `drop_fraction` of the history (of its turns,
  or of its tokens with drop_unit="tokens"), at least one turn. s never moves back.
- Truncate: when a turn is added, its tool results are middle-truncated (head and tail kept, a marker
  saying how many characters were cut) so that `P + turn + reserve <= C`: the latest turn and its
  results always fit in the next context. Longest results are cut first (water-filling), and no
  result exceeds max_tool_result_tokens when that is set. Truncation is a pure function of the content
  and the limits, so the agent and the splitter cut the same text the same way.

Agent loop:   ep = policy.new_episode(prefix); for each turn: v = ep.view();
              ids = generate(ep.prompt_ids(v), max_new_tokens=v.max_new_tokens);
              ep.add_turn(parsed_message, tool_results, action_ids=ids)
Splitter:     ep = policy.replay(messages)   (add_turn for every recorded turn; same code path)
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from klong_jax.config_mapping import known_items
from klong_jax.data.template_base import ROLE_CODES, ChatTemplate
from klong_jax.data.trajectory import Message, split_turns

DROP_UNITS = ("turns", "tokens")


class ContextOverflow(ValueError):
    """The context cannot be made to fit the budget (prefix too long, or one message too long)."""


@dataclass(frozen=True)
class ContextConfig:
    budget_tokens: int                      # C: the model's context budget
    reserve_tokens: int = 1024              # room kept for the next assistant message (generation
                                            # prompt, body, end of turn)
    drop_fraction: float = 0.3              # share of the history dropped when it overflows
    drop_unit: str = "turns"                # "turns" or "tokens"
    max_tool_result_tokens: int | None = None   # cap on one rendered tool result (None: only fit)
    truncation_marker: str = "\n[... {chars} characters truncated ...]\n"

    def __post_init__(self):
        if self.budget_tokens <= 0:
            raise ValueError(f"context.budget_tokens={self.budget_tokens} must be positive")
        if not 0 < self.reserve_tokens < self.budget_tokens:
            raise ValueError(f"context.reserve_tokens={self.reserve_tokens} must be in "
                             f"(0, budget_tokens={self.budget_tokens})")
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise ValueError(f"context.drop_fraction={self.drop_fraction} must be in [0, 1]")
        if self.drop_unit not in DROP_UNITS:
            raise ValueError(f"context.drop_unit={self.drop_unit!r}; choose one of {DROP_UNITS}")
        if self.max_tool_result_tokens is not None and self.max_tool_result_tokens <= 0:
            raise ValueError("context.max_tool_result_tokens must be positive or None")
        if "{chars}" not in self.truncation_marker:
            raise ValueError("context.truncation_marker must contain '{chars}'")

    @classmethod
    def from_mapping(cls, config: Mapping) -> ContextConfig:
        """From a dict or ml_collections.ConfigDict; unknown keys are an error."""
        return cls(**known_items(config, cls, "context"))


@dataclass(frozen=True)
class Truncation:
    turn: int
    observation: int          # index among the turn's observation messages
    original_tokens: int      # rendered tokens before and after
    tokens: int
    removed_chars: int


@dataclass(frozen=True)
class ContextView:
    """The context for turn `turn`: prefix + turns[start..turn-1] + the generation prompt."""
    turn: int
    start: int
    dropped: bool             # the start moved forward for this turn: a new window begins
    context_tokens: int       # prompt length, the generation prompt included
    max_new_tokens: int       # what the assistant message may still use (its end of turn included)
    truncations: tuple[Truncation, ...]   # in effect inside turns[start..turn-1]


@dataclass(frozen=True)
class RenderedTurn:
    index: int
    messages: tuple[Message, ...]   # assistant + observations as the model sees them (truncated)
    ids: np.ndarray                 # int32 [n]
    trainable: np.ndarray           # bool [n]: generated tokens (assistant body and end of turn)
    roles: np.ndarray               # int8 [n]
    action_len: int                 # tokens of the assistant message, its generation prompt included
    truncations: tuple[Truncation, ...]

    def __len__(self) -> int:
        return int(self.ids.shape[0])


class ContextPolicy:
    def __init__(self, template: ChatTemplate, config: ContextConfig):
        self.template = template
        self.config = config

    def new_episode(self, prefix_messages: Sequence[Message]) -> Episode:
        return Episode(self, prefix_messages)

    def replay(self, messages: Sequence[Message]) -> Episode:
        """Runs the policy over a recorded conversation, turn by turn, as the agent would have."""
        prefix, turns = split_turns(messages)
        episode = self.new_episode(prefix)
        for turn in turns:
            episode.add_turn(turn.assistant, turn.observations)
        return episode


class Episode:
    """The running context of one episode (the agent's state; the splitter's replay)."""

    def __init__(self, policy: ContextPolicy, prefix_messages: Sequence[Message]):
        self.policy = policy
        self.template = policy.template
        cfg = self.config = policy.config
        if not prefix_messages or any(m.role not in ("system", "user") for m in prefix_messages):
            raise ValueError("the prefix is the system and user messages before the first "
                             f"assistant message; got roles {[m.role for m in prefix_messages]}")
        self.prefix_messages = tuple(prefix_messages)
        rendered = self.template.render(self.prefix_messages)
        self.prefix_ids = rendered.input_ids
        self.prefix_roles = rendered.roles
        self.prefix_len = len(rendered)
        if self.prefix_len + cfg.reserve_tokens > cfg.budget_tokens:
            raise ContextOverflow(f"the prefix has {self.prefix_len} tokens; with reserve_tokens="
                                  f"{cfg.reserve_tokens} it exceeds budget_tokens={cfg.budget_tokens}")
        self.turns: list[RenderedTurn] = []
        self.starts: list[int] = []        # s_j, the start each turn was generated with
        self._cum = [0]                    # prefix sums of turn lengths
        self._start = 0
        self._pending: ContextView | None = None

    # ------------------------------------------------------------------------------------------
    # Views

    def history_tokens(self, start: int, end: int) -> int:
        return self._cum[end] - self._cum[start]

    def _advance(self, s: int, j: int) -> int:
        f = self.config.drop_fraction
        if self.config.drop_unit == "turns":
            return s + max(1, math.ceil(f * (j - s) - 1e-9))
        target = f * self.history_tokens(s, j)
        s2 = s + 1
        while s2 < j and self.history_tokens(s, s2) < target:
            s2 += 1
        return s2

    def view(self, next_action_tokens: int | None = None) -> ContextView:
        """The context for the next turn. The agent calls it with no argument before generating;
        the splitter passes the recorded assistant message's length."""
        cfg, P, j = self.config, self.prefix_len, len(self.turns)
        need = max(cfg.reserve_tokens, next_action_tokens or 0)
        s = self._start
        while s < j and P + self.history_tokens(s, j) + need > cfg.budget_tokens:
            s = self._advance(s, j)
        used = P + self.history_tokens(s, j)
        if used + need > cfg.budget_tokens:
            raise ContextOverflow(f"turn {j}: the assistant message has {need} tokens; with the "
                                  f"{P}-token prefix it exceeds budget_tokens={cfg.budget_tokens}")
        truncations = tuple(t for turn in self.turns[s:j] for t in turn.truncations)
        g = len(self.template.generation_prompt_ids)
        view = ContextView(j, s, s > self._start, used + g, cfg.budget_tokens - used - g, truncations)
        self._pending = view
        return view

    def _current(self, view: ContextView | None) -> ContextView:
        if view is None:
            return self.view()
        if view.turn != len(self.turns):
            raise ValueError(f"a view for turn {view.turn}, but the next turn is {len(self.turns)}")
        return view

    def prompt_ids(self, view: ContextView | None = None) -> np.ndarray:
        """prefix + turns[start..j-1] + generation prompt: what the model is given for turn j."""
        view = self._current(view)
        parts = [self.prefix_ids] + [t.ids for t in self.turns[view.start:view.turn]]
        parts.append(np.asarray(self.template.generation_prompt_ids, np.int32))
        return np.concatenate(parts)

    def context_messages(self, view: ContextView | None = None) -> list[Message]:
        """The same context as messages (tool results truncated), for a chat-API model."""
        view = self._current(view)
        return list(self.prefix_messages) + [m for t in self.turns[view.start:view.turn]
                                             for m in t.messages]

    # ------------------------------------------------------------------------------------------
    # Adding turns

    def add_turn(self, assistant: Message, observations: Sequence[Message] = (), *,
                 action_ids: Sequence[int] | None = None) -> RenderedTurn:
        """Records turn j. `action_ids`: the ids the sampler generated after the generation prompt (its
        end of turn included); without them the message is rendered by the template."""
        if assistant.role != "assistant" or any(m.role == "assistant" for m in observations):
            raise ValueError("a turn is one assistant message and the non-assistant messages after it")
        cfg, j = self.config, len(self.turns)
        if action_ids is None:
            a_ids, a_train = self.template.render_message(assistant, None)
        else:
            a_ids, a_train = self.template.assistant_ids(action_ids)
        generated = len(a_ids) - len(self.template.generation_prompt_ids)
        view = self._pending if self._pending is not None and self._pending.turn == j else None
        if view is None or generated > view.max_new_tokens:
            if view is not None and action_ids is not None:
                raise ContextOverflow(f"turn {j}: {generated} generated tokens exceed the "
                                      f"view's max_new_tokens={view.max_new_tokens}")
            view = self.view(len(a_ids))
        self._start = view.start
        self._pending = None
        available = cfg.budget_tokens - cfg.reserve_tokens - self.prefix_len - len(a_ids)
        obs, o_ids, o_roles, truncations = self._fit_observations(j, assistant, observations,
                                                                  available)
        ids = np.asarray(a_ids + o_ids, np.int32)
        trainable = np.asarray(a_train + [False] * len(o_ids), bool)
        roles = np.asarray([ROLE_CODES["assistant"]] * len(a_ids) + o_roles, np.int8)
        turn = RenderedTurn(j, (assistant,) + obs, ids, trainable, roles, len(a_ids), truncations)
        self.turns.append(turn)
        self.starts.append(view.start)
        self._cum.append(self._cum[-1] + len(turn))
        return turn

    def _render(self, message: Message, prev: Message) -> list[int]:
        return self.template.render_message(message, prev)[0]

    def _fit_observations(self, j: int, assistant: Message, observations: Sequence[Message],
                          available: int):
        cfg = self.config
        msgs = list(observations)
        prevs = [assistant] + msgs[:-1]   # truncation changes content only, never the role tokens
        rendered = [self._render(m, p) for m, p in zip(msgs, prevs)]
        lengths = [len(r) for r in rendered]
        limits = [cfg.max_tool_result_tokens if m.role == "tool" and cfg.max_tool_result_tokens
                  else None for m in msgs]
        tool_idx = [i for i, m in enumerate(msgs) if m.role == "tool"]
        capped = [min(n, lim) if lim else n for n, lim in zip(lengths, limits)]
        fixed = sum(n for i, n in enumerate(capped) if i not in tool_idx)
        tool_budget = available - fixed
        if sum(capped[i] for i in tool_idx) > tool_budget:
            level = _water_level([capped[i] for i in tool_idx], max(tool_budget, 0))
            for i in tool_idx:
                limits[i] = min(limits[i] or level, level)
        truncations = []
        out_ids: list[int] = []
        out_roles: list[int] = []
        for i, (m, p) in enumerate(zip(msgs, prevs)):
            removed, ids = 0, rendered[i]
            if limits[i] is not None and lengths[i] > limits[i]:
                m, removed = self._truncate(m, p, limits[i], lengths[i])
                msgs[i] = m
                ids = self._render(m, p)
            if removed:
                truncations.append(Truncation(j, i, lengths[i], len(ids), removed))
            out_ids += ids
            out_roles += [ROLE_CODES[m.role]] * len(ids)
        return tuple(msgs), out_ids, out_roles, tuple(truncations)

    def _truncate(self, message: Message, prev: Message, limit: int, length: int
                  ) -> tuple[Message, int]:
        """(message, removed characters): the most content (head and tail, a marker between) within
        `limit` rendered tokens (`length`: the message's rendered tokens now); the marker alone
        when even that does not fit."""
        content, marker = message.content, self.config.truncation_marker
        n = len(content)

        def build(keep: int) -> Message:
            head, tail = content[:(keep + 1) // 2], content[n - keep // 2:] if keep // 2 else ""
            return dataclasses.replace(message, content=head + marker.format(chars=n - keep) + tail)

        def fits(keep: int) -> bool:
            return len(self._render(build(keep), prev)) <= limit

        lo, hi = 0, n - 1
        marker_only = len(self._render(build(0), prev))
        if marker_only > limit:
            # Nothing fits: keep whichever is shorter; the next view drops this turn if need be.
            return (message, 0) if length <= marker_only else (build(0), n)
        # Bracket the answer near the characters-per-token estimate before bisecting: the search
        # is exact either way, the estimate only saves encodes of long texts.
        guess = min(n - 1, int(n * (limit - marker_only) / max(length - marker_only, 1)))
        if guess > 0 and fits(guess):
            lo = guess
            upper = min(n - 1, guess + guess // 8 + 16)
            if upper > lo:
                if fits(upper):
                    lo = upper
                else:
                    hi = upper - 1
        elif guess > 0:
            hi = guess - 1
        while lo < hi:   # largest kept-character count that fits; size(lo) <= limit throughout
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return build(lo), n - lo


def _water_level(lengths: Sequence[int], budget: int) -> int:
    """Largest level L with sum(min(l, L)) <= budget."""
    lo, hi = 0, max(lengths, default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lengths) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
