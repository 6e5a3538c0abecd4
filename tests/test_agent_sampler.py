"""The agent on the real KV-cache sampler with a tiny random MoE model: concurrent episodes run and
are graded, and the RL rows built from the records are exactly what the model computed: the
sampler's log-probs sit on the right targets of each window and the recorded routing is the
model's own routing of that window (what routing replay will force)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klong_jax.agent import rollout_windows, run_episodes
from klong_jax.agent.sampler_policy import SamplerPolicy
from klong_jax.models import init_model, preset
from klong_jax.sandbox import SandboxPool
from test_agent import agent_config, make_suite


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    suite = make_suite(tmp_path_factory.mktemp("suite"))
    cfg = preset("tiny", vocab_size=512, hidden_size=64, num_hidden_layers=2, n_routed_experts=4,
                 compute_dtype="float32", param_dtype="float32", attention_impl="reference")
    model = init_model(cfg, None, seed=0)
    # One prompt bucket and one new-token bucket: a single compilation serves every step.
    policy = SamplerPolicy.from_model(model, seed=3, min_prompt_bucket=1536, min_new_bucket=32)
    config = agent_config(budget=1500, reserve=100, max_turns=4, max_new_tokens_per_turn=24,
                          reminder_every=2)
    results = run_episodes(suite.tasks, policy, n_per_task=2, template=suite.template,
                           config=config, pool=SandboxPool(4),
                           workdir=str(tmp_path_factory.mktemp("episodes")),
                           return_routing=True, return_prompt_routing=True)
    return suite, model, config, results


def test_sampled_episodes_run_and_are_graded(sampled_run):
    suite, model, config, results = sampled_run
    assert len(results) == 4
    for r in results:
        assert r.finish_reason in ("max_turns", "submit", "context_overflow") and r.error is None
        assert r.grade_valid and 0.0 <= r.reward <= 1.0
        assert 1 <= len(r.turns) <= config.max_turns
        for t in r.turns:
            assert 1 <= len(t.sampled_ids) <= config.max_new_tokens_per_turn
            assert t.logprobs.shape == t.sampling_logprobs.shape == t.sampled_ids.shape
            assert np.all(t.logprobs <= 0)
            assert t.routed_experts.shape == (model.cfg.num_moe_layers, len(t.sampled_ids),
                                              model.cfg.num_experts_per_tok)
    # The seeds are per (episode, turn): the two episodes of a task sample differently.
    assert results[0].turns[0].sampled_ids.tolist() != results[1].turns[0].sampled_ids.tolist()
    assert any(len(r.windows()) >= 2 for r in results), "the budget should force a drop"


def test_rollout_rows_match_the_models_own_computation(sampled_run):
    _, model, _, results = sampled_run
    rows = [row for r in results for row in rollout_windows(r)]
    for r in results:
        assert sum(int(row.loss_mask.sum()) for row in rollout_windows(r)) == r.sampled_tokens
    assert any(t.prompt_routing_from > 0 for r in results for t in r.turns), \
        "some window should hold several generated turns"
    # All rows in one forward pass, padded at the end (causal: padding changes no earlier position).
    T = max(len(row) for row in rows)
    ids_BT = np.zeros((len(rows), T), np.int32)
    for b, row in enumerate(rows):
        ids_BT[b, :len(row)] = row.input_ids
    positions_BT = np.broadcast_to(np.arange(T, dtype=np.int32), ids_BT.shape)
    logits_BTV, routed_LBTK = model(jnp.asarray(ids_BT), positions_BT=jnp.asarray(positions_BT),
                                    return_routing=True)
    logp_BTV = np.asarray(jax.nn.log_softmax(logits_BTV, axis=-1))
    routed_LBTK = np.asarray(routed_LBTK)
    for b, row in enumerate(rows):
        n = len(row)
        logp_T = logp_BTV[b, np.arange(n), row.targets]
        mask = row.loss_mask.astype(bool)
        np.testing.assert_allclose(row.old_logprobs[mask], logp_T[mask], atol=2e-4)
        assert np.all(row.old_logprobs[~mask] == 0)
        # Every position but an appended end-of-turn token has its sampling-time routing.
        assert row.routing_known.sum() >= n - 1
        known = row.routing_known
        same = routed_LBTK[:, b, :n][:, known] == row.routed_experts[:, known]
        assert same.all(axis=-1).mean() > 0.99
