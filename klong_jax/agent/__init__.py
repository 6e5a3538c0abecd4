"""The agent: multi-turn rollouts under the ContextPolicy, with tools in sandboxes, and evaluation.

    config = AgentConfig(context=ContextConfig(budget_tokens=..., ...), timeout_s=..., max_turns=...)
    results = run_episodes(tasks, policy, n_per_task=G, template=template, config=config,
                           pool=SandboxPool(max_concurrent=16), workdir=DIR, return_routing=True)
    r = results[i]: r.reward (rubric score), r.finish_reason, r.turns[j] (TurnRecord: start, window,
        prompt_len, sampled_ids, logprobs, sampling_logprobs, routed_experts, ...),
        r.prompt_ids(j) (the exact context of turn j), r.windows(), r.trajectory()
    rows = rollout_windows(r)     # RL rows: ids, loss mask, old log-probs, routing per window
    report, results = evaluate(tasks, policy, template=template, config=config, workdir=DIR)

A policy is anything with `generate(prompts, params, *, requests) -> completions`
(`klong_jax.agent.policy`): `SamplerPolicy` (the KV-cache sampler: `SamplerPolicy.from_model(model,
mesh, seed=0)`, `.update_params(params)`; in `klong_jax.agent.sampler_policy`, which imports JAX) or
`ScriptedPolicy` (replays recorded assistant turns through the real loop) or `ChatPolicy` (a model behind
an OpenAI-compatible chat endpoint: the Research-Factory's teacher; `klong_jax.agent.chat_policy`). This
package imports no JAX.
"""
from klong_jax.agent.chat_policy import ChatPolicy, tool_schemas
from klong_jax.agent.config import AgentConfig, RolloutConfig
from klong_jax.agent.episode import AgentEpisode, prefix_messages
from klong_jax.agent.evaluate import aggregate, evaluate, format_table, summarize
from klong_jax.agent.policy import Completion, GenerationParams, Policy, TurnRequest, clip_completion
from klong_jax.agent.records import FINISH_REASONS, EpisodeResult, TurnRecord
from klong_jax.agent.rollout import RolloutWindow, rollout_windows
from klong_jax.agent.runner import run_episodes
from klong_jax.agent.scripted import ScriptedPolicy
from klong_jax.agent.turn import ARG_TYPES, parse_turn

__all__ = ["ARG_TYPES", "AgentConfig", "ChatPolicy", "RolloutConfig", "AgentEpisode", "Completion", "EpisodeResult",
           "FINISH_REASONS", "GenerationParams", "Policy", "RolloutWindow", "ScriptedPolicy",
           "TurnRecord", "TurnRequest", "aggregate", "clip_completion", "evaluate", "format_table",
           "parse_turn", "prefix_messages", "rollout_windows", "run_episodes", "summarize", "tool_schemas"]
