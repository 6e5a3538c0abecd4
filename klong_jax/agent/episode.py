"""One agent episode as a state machine the runner steps: ask for a turn, take its completion.

    ep = AgentEpisode(episode_id, task, g, sandbox, context_policy, config)
    while (ask := ep.next_request()) is not None:
        request, prompt = ask
        ep.advance(policy.generate([prompt], params, requests=[request])[0])
    result = ep.result()

The context is the ContextPolicy's (`policy.new_episode(prefix)`, `view()`, `add_turn(...,
action_ids=sampled)`), the object the SFT splitter replays. The prefix is the system prompt with the
tools and the task spec, as in the expert trajectories. An episode ends at submit, at its wall-clock
timeout, after max_turns turns, when it has generated max_total_tokens, or when the context cannot
hold another turn.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from klong_jax.agent.config import AgentConfig
from klong_jax.agent.policy import TurnRequest, clip_completion
from klong_jax.agent.records import EpisodeResult, TurnRecord
from klong_jax.agent.turn import clip_after_first_call, feedback_message, parse_turn, reminder_text, run_calls
from klong_jax.data.context import ContextOverflow, ContextPolicy, ContextView
from klong_jax.data.trajectory import Message
from klong_jax.tasks.task import Task
from klong_jax.tasks.tools import run_tool, system_prompt


def prefix_messages(task: Task) -> list[Message]:
    """The episode's prefix: the system prompt (instructions and tools) and the task."""
    return [Message("system", system_prompt()), Message("user", task.spec)]


class AgentEpisode:
    def __init__(self, episode_id: str, task: Task, group_index: int, sandbox,
                 context_policy: ContextPolicy, config: AgentConfig,
                 clock: Callable[[], float] = time.monotonic):
        self.episode_id = episode_id
        self.task = task
        self.group_index = group_index
        self.sandbox = sandbox
        self.config = config
        self.template = context_policy.template
        self.clock = clock
        self.started = clock()
        self.messages = prefix_messages(task)
        self.turns: list[TurnRecord] = []
        self.sampled_tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.elapsed_at_end = 0.0
        self._view: ContextView | None = None
        self._limit = 0
        self._window = -1
        try:
            self.context = context_policy.new_episode(self.messages)
        except ContextOverflow as e:
            self.context = None
            self._finish("context_overflow", str(e))

    # ------------------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def elapsed(self) -> float:
        return self.clock() - self.started

    def time_left(self) -> float:
        return self.config.timeout_s - self.elapsed()

    def _finish(self, reason: str, error: str | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.error = error
            self.elapsed_at_end = self.elapsed()

    def fail(self, error: BaseException) -> None:
        """Ends the episode on an infrastructure failure (sandbox, host); the runner still grades
        what it did, and the error stays on the result."""
        self._finish("error", f"{type(error).__name__}: {error}")

    def next_request(self) -> tuple[TurnRequest, list[int]] | None:
        """The next turn's request and exact prompt, or None when the episode has ended."""
        if self.finished:
            return None
        cfg, j = self.config, len(self.turns)
        if self.time_left() <= 0:
            self._finish("timeout")
        elif j >= cfg.max_turns:
            self._finish("max_turns")
        elif self.sampled_tokens >= cfg.max_total_tokens:
            self._finish("max_tokens")
        if self.finished:
            return None
        try:
            view = self.context.view()
        except ContextOverflow as e:
            self._finish("context_overflow", str(e))
            return None
        # One token stays free for the end-of-turn token a cut-off message gets appended.
        limit = min(view.max_new_tokens - 1, cfg.max_new_tokens_per_turn or math.inf,
                    cfg.max_total_tokens - self.sampled_tokens)
        if limit < 1:
            self._finish("context_overflow", f"turn {j}: no room left to generate "
                                             f"(max_new_tokens={view.max_new_tokens})")
            return None
        self._view, self._limit = view, int(limit)
        request = TurnRequest(self.episode_id, self.task.task_id, j, self._limit,
                              messages=tuple(self.context.context_messages(view)))
        return request, self.context.prompt_ids(view).tolist()

    def advance(self, completion) -> None:
        """Takes the completion of the requested turn: parse, run tools, extend the context. A completion
        with `error` set ends the episode as an error (finish_reason "error"), adding no turn."""
        if self._view is None or self.finished:
            raise RuntimeError(f"episode {self.episode_id}: advance() without a pending request")
        cfg, j, view = self.config, len(self.turns), self._view
        self._view = None
        error = getattr(completion, "error", None)
        if error:   # the policy produced no turn (e.g. its chat endpoint failed after its retries)
            self._finish("error", f"turn {j}: {error}")
            return
        clipped = clip_completion(completion, self._limit, self.template.stop_ids)
        stopped_after_call = False
        if cfg.one_call_per_turn:
            clipped, stopped_after_call = clip_after_first_call(clipped, self.template)
        new_window = j == 0 or view.start != self.turns[-1].start
        routing_from = 0 if new_window else self.turns[-1].prompt_len
        prompt_routed = clipped.prompt_routed_experts
        if prompt_routed is not None:
            if prompt_routed.ndim != 3 or prompt_routed.shape[1] != view.context_tokens:
                raise ValueError(f"prompt routed experts of shape {prompt_routed.shape} for a "
                                 f"{view.context_tokens}-token prompt")
            prompt_routed = prompt_routed[:, routing_from:]
        turn = parse_turn(self.template, clipped.tokens, j, stopped_after_call=stopped_after_call)
        tool_messages, submitted, out_of_time = run_calls(
            turn.parsed, lambda name, args: run_tool(self.sandbox, name, args,
                                                     blacklist=getattr(self.task, "blacklist", ())),
            self.time_left, submit_refused=None if cfg.submit_ends_episode else cfg.submit_refused_message)
        reminder = None
        if cfg.reminder_every and (j + 1) % cfg.reminder_every == 0:
            reminder = reminder_text(j, self.elapsed(), cfg.timeout_s, cfg.max_turns)
        feedback = None if submitted else feedback_message(turn, reminder=reminder, nudge=cfg.nudge_message,
                                                            format_hint=self.template.format_hint)
        observations = tool_messages + ([feedback] if feedback is not None else [])
        self.context.add_turn(turn.parsed.message, observations, action_ids=turn.action_ids)
        self._window += new_window
        self.turns.append(TurnRecord(
            index=j, start=view.start, window=self._window, prompt_len=view.context_tokens,
            sampled_ids=np.asarray(clipped.tokens, np.int32), logprobs=clipped.logprobs,
            sampling_logprobs=clipped.sampling_logprobs, routed_experts=clipped.routed_experts,
            prompt_routed_experts=prompt_routed, prompt_routing_from=routing_from,
            n_forced=turn.n_forced, finish=clipped.finish_reason, canonical=turn.canonical,
            parse_errors=turn.parsed.errors,
            tools=tuple(c.name for c in turn.parsed.message.tool_calls)))
        self.messages += [turn.parsed.message] + observations
        self.sampled_tokens += len(clipped.tokens)
        if submitted:
            self._finish("submit")
        elif out_of_time:
            self._finish("timeout")

    def result(self) -> EpisodeResult:
        if not self.finished:
            raise RuntimeError(f"episode {self.episode_id} has not ended")
        return EpisodeResult(
            episode_id=self.episode_id, task_id=self.task.task_id, group_index=self.group_index,
            finish_reason=self.finish_reason, messages=list(self.messages), turns=list(self.turns),
            context=self.context, elapsed_s=self.elapsed_at_end, error=self.error)
