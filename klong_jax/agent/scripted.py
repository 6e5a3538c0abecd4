"""ScriptedPolicy: replays recorded assistant turns through the real agent loop.

For turn j of an episode of task T it returns the ids of T's j-th scripted assistant message, as the
chat template renders it (after the generation prompt, its end-of-turn token included), cut at the
request's token limit. Everything around it is real: the prompt it is given (checked to start with
the task's prefix), the parse of its ids, the tools in the sandbox, the context policy, grading. A
script entry that is a string is raw model output in the template's text form (tags written out),
for replaying malformed turns.

Not a model: it has no log-probs or routing. It records every prompt it was given (`prompts`) and
the size of every batch (`batch_sizes`), so tests can compare them with what the agent recorded.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from klong_jax.agent.policy import Completion, GenerationParams, TurnRequest
from klong_jax.data.template_base import ChatTemplate
from klong_jax.data.trajectory import Message, Trajectory, parse_trajectory, split_turns


class ScriptedPolicy:
    def __init__(self, template: ChatTemplate, scripts: Mapping[str, Sequence[Message | str]], *,
                 prefixes: Mapping[str, Sequence[Message]] | None = None):
        """scripts: task id -> its assistant turns in order. prefixes: task id -> the prefix
        messages every prompt of that task must start with."""
        self.template = template
        self._scripts = {task_id: [self._ids(entry) for entry in turns]
                         for task_id, turns in scripts.items()}
        self._prefix_ids = {task_id: template.render(list(msgs)).input_ids.tolist()
                            for task_id, msgs in (prefixes or {}).items()}
        self.prompts: dict[tuple[str, int], list[int]] = {}
        self.batch_sizes: list[int] = []

    @classmethod
    def from_trajectories(cls, template: ChatTemplate, trajectories: Sequence[Trajectory | dict]
                          ) -> ScriptedPolicy:
        """Replays each trajectory's assistant messages for its task (one trajectory per task)."""
        scripts, prefixes = {}, {}
        for t in trajectories:
            if isinstance(t, dict):
                t = parse_trajectory(t)
            if t.task_id in scripts:
                raise ValueError(f"two trajectories for task {t.task_id}: a script per task")
            prefix, turns = split_turns(t.messages)
            scripts[t.task_id] = [turn.assistant for turn in turns]
            prefixes[t.task_id] = prefix
        return cls(template, scripts, prefixes=prefixes)

    def _ids(self, entry: Message | str) -> list[int]:
        if isinstance(entry, Message):
            if entry.role != "assistant":
                raise ValueError(f"a script holds assistant messages, got a {entry.role} message")
            return self.template.completion_ids(entry)   # the generation prompt is the prompt's
        # Raw output text: template tokens spelled out become their ids, the text runs are encoded.
        return self.template.encode_output_text(entry)

    def generate(self, prompts: Sequence[Sequence[int]], params: GenerationParams, *,
                 requests: Sequence[TurnRequest] | None = None) -> list[Completion]:
        if requests is None or len(requests) != len(prompts):
            raise ValueError("ScriptedPolicy replays by (task, turn): give one request per prompt")
        self.batch_sizes.append(len(prompts))
        out = []
        for prompt, request in zip(prompts, requests):
            script = self._scripts.get(request.task_id)
            if script is None:
                raise KeyError(f"no script for task {request.task_id!r}")
            if request.turn >= len(script):
                raise IndexError(f"episode {request.episode_id} asks for turn {request.turn}; the "
                                 f"script of {request.task_id} has {len(script)} turns")
            prefix = self._prefix_ids.get(request.task_id)
            if prefix is not None and list(prompt[:len(prefix)]) != prefix:
                raise ValueError(f"episode {request.episode_id} turn {request.turn}: the prompt does "
                                 "not start with the task's prefix")
            self.prompts[(request.episode_id, request.turn)] = [int(i) for i in prompt]
            ids = script[request.turn]
            limit = min(params.max_new_tokens, request.max_new_tokens)
            out.append(Completion(ids[:limit], finish_reason="stop" if len(ids) <= limit
                                  else "length"))
        return out
