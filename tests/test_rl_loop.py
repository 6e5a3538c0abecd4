"""RL plumbing on real sampled episodes: packed RL rows reproduce the sampler's log-probs under the trainer's
forward with routing replay, and one RL update on the 8-device mesh equals the same update on one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from klong_jax.agent import AgentConfig, run_episodes
from klong_jax.agent.sampler_policy import SamplerPolicy
from klong_jax.data.chat_template import Glm45Template
from klong_jax.data.context import ContextConfig
from klong_jax.data.tokenizer import load_tokenizer
from klong_jax.models import init_model, preset
from klong_jax.rl.batch import build_rows, to_batches
from klong_jax.rl.step import jit_rl_fns, old_logprobs, rl_update
from klong_jax.sandbox import SandboxPool
from klong_jax.sharding import make_mesh
from klong_jax.tasks import load_task
from klong_jax.training.embedded_data import prepare_embedded
from klong_jax.training.optimizer import learning_rate_schedule
from klong_jax.training.state import split_model

SEQ = 1024
RL = ConfigDict(dict(eps_low=0.2, eps_high=0.28, kl_coef=0.0, tis_cap=2.0, routing_replay=True))
OPT = ConfigDict(dict(lr=1e-3, warmup_steps=0, final_lr_fraction=1.0, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0,
                      clip_norm=1.0))


def sampled_rows(root, temperature: float = 1.0):
    """Two episodes of the first embedded train task sampled from a random tiny MoE at `temperature`,
    packed into RL rows with advantages +1 and -1."""
    import os
    section = ConfigDict(dict(n_train=2, n_heldout=1, seed=0, difficulty=1, length=4, mistake_prob=0.0,
                              vocab_size=600))
    paths = prepare_embedded(section, cache_root=str(root / "cache"))
    tok = load_tokenizer(paths["tokenizer"])
    cfg = preset("tiny", compute_dtype="float32", vocab_size=640, num_hidden_layers=2, n_routed_experts=4)
    model = init_model(cfg, seed=0)
    template = Glm45Template(tok)
    tasks = [load_task(os.path.join(paths["train_tasks"], n)) for n in sorted(os.listdir(paths["train_tasks"]))[:1]]
    agent_cfg = AgentConfig(context=ContextConfig(budget_tokens=SEQ, reserve_tokens=128), timeout_s=60, max_turns=3,
                            max_new_tokens_per_turn=24, temperature=temperature)
    results = run_episodes(tasks, SamplerPolicy.from_model(model), n_per_task=2, template=template, config=agent_cfg,
                           pool=SandboxPool(max_concurrent=2), workdir=str(root / "episodes"), return_routing=True,
                           return_prompt_routing=True)
    advantages = {r.episode_id: (1.0 if i == 0 else -1.0) for i, r in enumerate(results)}
    rows, stats = build_rows(results, advantages, seq_len=SEQ, pad_id=tok.pad_id, num_moe_layers=cfg.num_moe_layers,
                             top_k=cfg.num_experts_per_tok)
    return model, cfg, rows, stats


@pytest.fixture(scope="module")
def rollout(tmp_path_factory):
    return sampled_rows(tmp_path_factory.mktemp("rl"))


def test_rows_reproduce_sampler_logprobs_with_routing_replay(rollout):
    model, cfg, rows, stats = rollout
    assert rows and stats.windows >= 2
    graphdef, params, rest = split_model(model)
    for batch in to_batches(rows, 2):
        mask = batch["rl_mask"] > 0
        assert mask.any()
        assert ((batch["routed"] >= 0).all(axis=(2, 3)) | ~mask).all(), "sampled tokens carry their routing"
        with_replay, without = old_logprobs(params, rest, batch, graphdef=graphdef)
        np.testing.assert_allclose(np.asarray(with_replay)[mask], batch["sampler_logprobs"][mask], atol=1e-4)
        assert (np.sign(batch["advantages"][mask]) != 0).all()
        # rl.replay_gap=False: only the pass the update uses, the same numbers.
        only_replay, none = old_logprobs(params, rest, batch, graphdef=graphdef, replay_gap=False)
        none2, only_plain = old_logprobs(params, rest, batch, graphdef=graphdef, routing_replay=False,
                                         replay_gap=False)
        assert none is None and none2 is None
        np.testing.assert_array_equal(np.asarray(only_replay), np.asarray(with_replay))
        np.testing.assert_array_equal(np.asarray(only_plain), np.asarray(without))


def test_tempered_rollouts_are_reproduced_at_the_rollout_temperature(tmp_path):
    """Rollouts sampled at T=0.6 carry log-probs of softmax(logits / 0.6): the trainer matches them only when it
    applies the same temperature (at T=1 the ratio would be biased on every token)."""
    model, cfg, rows, _ = sampled_rows(tmp_path, temperature=0.6)
    graphdef, params, rest = split_model(model)
    batch = to_batches(rows, 2)[0]
    mask = batch["rl_mask"] > 0
    tempered, _ = old_logprobs(params, rest, batch, graphdef=graphdef, temperature=0.6)
    untempered, _ = old_logprobs(params, rest, batch, graphdef=graphdef)
    np.testing.assert_allclose(np.asarray(tempered)[mask], batch["sampler_logprobs"][mask], atol=1e-4)
    assert np.abs(np.asarray(untempered)[mask] - batch["sampler_logprobs"][mask]).mean() > 1e-2


def test_rl_update_on_mesh_equals_single_device(rollout):
    model, cfg, rows, _ = rollout
    graphdef, params, rest = split_model(model)
    batch = to_batches(rows, 8)[0]
    with_replay, _ = old_logprobs(params, rest, batch, graphdef=graphdef)
    batch["old_logprobs"] = np.asarray(with_replay)
    # Plain SGD with lr 1: the update IS the gradient, so the comparison is not blurred by Adam's
    # normalisation of near-zero gradients.
    import optax
    tx = optax.sgd(1.0)

    def run(mesh):
        state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
        fn = jax.jit(lambda s, b: rl_update(s, rest, s["params"], b, graphdef=graphdef, tx=tx, rl_cfg=RL,
                                            lr_schedule=learning_rate_schedule(OPT, 10)))
        if mesh is None:
            return fn(state, batch)
        with jax.set_mesh(mesh):
            return fn(state, batch)

    single_state, single_m = run(None)
    mesh_state, mesh_m = run(make_mesh({"fsdp": 2, "expert": 4}))
    assert int(single_m["nonfinite"]) == 0 and float(single_m["grad_norm"]) > 0
    np.testing.assert_allclose(float(mesh_m["loss"]), float(single_m["loss"]), rtol=1e-5, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 mesh_state["params"], single_state["params"])
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), single_state["params"], params)
    assert max(jax.tree.leaves(moved)) > 0


def test_clipping_reference_is_the_rollout_policy_for_every_batch(rollout):
    """update_policy over several batches: every batch's old log-probs (the clipping reference) are the
    rollout policy's, so they match the sampler's even for batches that come after an update."""
    from klong_jax.rl.loop import update_policy
    from klong_jax.rl.step import jit_rl_fns
    from klong_jax.sharding import logical_to_spec
    from klong_jax.training.optimizer import make_optimizer
    from klong_jax.training.state import abstract_layout, new_state
    from klong_jax.training.step import state_shardings
    model, cfg, rows, _ = rollout
    assert len(rows) >= 2
    rl = ConfigDict({**RL.to_dict(), "batch_rows": 1, "ppo_epochs": 1, "seq_len": SEQ})
    mesh = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    tx = make_optimizer(OPT, 10)
    graphdef, abs_params, _, param_sh, rest_sh = abstract_layout(cfg, mesh)
    state_sh = state_shardings(tx, param_sh, abs_params, mesh)
    update_fn, old_fn = jit_rl_fns(graphdef, tx, rl, learning_rate_schedule(OPT, 10), state_sh, rest_sh, mesh)
    _, params, rest = split_model(model)
    with jax.set_mesh(mesh):
        state = new_state(jax.tree.map(jnp.copy, params), tx, state_sh)
        state, metrics = update_policy(update_fn, old_fn, state, jax.device_put(rest, rest_sh), state["params"],
                                       rows, rl, mesh, logical_to_spec(("batch", "seq"), (1, SEQ), mesh))
    assert metrics["mismatch_with_replay"] < 1e-4, metrics
    assert metrics["grad_norm"] > 0


def test_an_update_raises_the_positive_episode_and_lowers_the_negative_one(rollout):
    """The sign of the whole path (rows, masks, advantages, loss, optimizer): one small SGD step on the
    packed rows, episode 0 at advantage +1 and episode 1 at -1, raises the mean log-prob of episode 0's
    sampled tokens and lowers episode 1's. (First order: d(mean logp_e) = lr * g_e . g, and the loss is
    -sum_e A_e sum_t logp / N, so the step moves each episode's log-probs in the direction of its advantage
    as long as its own term dominates its dot product with the other's, true for a small step on two
    different samples; the test would fail with the sign of the advantages or of the loss flipped.)"""
    import optax
    model, cfg, rows, _ = rollout
    graphdef, params, rest = split_model(model)
    batch = to_batches(rows, 8)[0]
    with_replay, _ = old_logprobs(params, rest, batch, graphdef=graphdef)
    batch["old_logprobs"] = np.asarray(with_replay)
    tx = optax.sgd(0.05)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    new_state, m = jax.jit(lambda s, b: rl_update(s, rest, s["params"], b, graphdef=graphdef, tx=tx, rl_cfg=RL,
                                                  lr_schedule=learning_rate_schedule(OPT, 10)))(state, batch)
    assert int(m["nonfinite"]) == 0
    after, _ = old_logprobs(new_state["params"], rest, batch, graphdef=graphdef)
    mask = batch["rl_mask"] > 0
    delta = (np.asarray(after) - np.asarray(with_replay))
    pos, neg = mask & (batch["advantages"] > 0), mask & (batch["advantages"] < 0)
    assert pos.any() and neg.any()
    assert delta[pos].mean() > 0 > delta[neg].mean(), (delta[pos].mean(), delta[neg].mean())


def test_minibatch_of_micro_batches_equals_one_big_batch(rollout):
    """rl.minibatches=1: the rows fed one per micro-batch (batch_rows=1), gradients summed in-graph with every
    loss normalised by the mini-batch's loss tokens, then ONE optimizer step, give the same parameters and loss
    as one rl_update on all rows as a single batch (AdamW's first step amplifies any difference: m/sqrt(v) is
    sign(g) elementwise, so a wrong normalisation or a missing micro-batch flips parameters by 2 lr)."""
    from klong_jax.rl.loop import update_policy
    from klong_jax.rl.step import jit_rl_minibatch_update
    from klong_jax.sharding import logical_to_spec
    from klong_jax.training.optimizer import make_optimizer
    from klong_jax.training.state import abstract_layout, new_state
    from klong_jax.training.step import state_shardings
    model, cfg, rows, _ = rollout
    assert len(rows) >= 2
    mesh = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    tx = make_optimizer(OPT, 10)
    graphdef, abs_params, _, param_sh, rest_sh = abstract_layout(cfg, mesh)
    state_sh = state_shardings(tx, param_sh, abs_params, mesh)
    _, params, rest = split_model(model)
    lr = learning_rate_schedule(OPT, 10)
    results = {}
    for name, batch_rows, minibatches in (("one batch", len(rows), 0), ("micro-batches", 1, 1)):
        rl = ConfigDict({**RL.to_dict(), "batch_rows": batch_rows, "ppo_epochs": 1, "seq_len": SEQ,
                         "minibatches": minibatches})
        update_fn, old_fn = jit_rl_fns(graphdef, tx, rl, lr, state_sh, rest_sh, mesh)
        minibatch_fn = jit_rl_minibatch_update(graphdef, tx, rl, lr, state_sh, rest_sh, mesh) if minibatches else None
        with jax.set_mesh(mesh):
            state = new_state(jax.tree.map(jnp.copy, params), tx, state_sh)
            state, metrics = update_policy(update_fn, old_fn, state, jax.device_put(rest, rest_sh), state["params"],
                                           rows, rl, mesh, logical_to_spec(("batch", "seq"), (batch_rows, SEQ), mesh),
                                           minibatch_fn=minibatch_fn)
        results[name] = (jax.device_get(state["params"]), metrics, int(state["step"]))
    (p1, m1, s1), (p2, m2, s2) = results["one batch"], results["micro-batches"]
    assert s1 == s2 == 1, "one optimizer step each"
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-4)
    # lr 1e-3: a flipped sign would differ by 2e-3; summation order alone moves elements whose gradient is near
    # Adam's eps (m / (sqrt(v) + eps) is then sensitive to the last bits): a few 1e-6, and one element of 81,920 by
    # 3.2e-5 with the in-graph sum (session 13). So: every element within 1e-4, and at most 1 in 10,000 above 2e-5.
    diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                            for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1))])
    assert diffs.max() < 1e-4 and (diffs > 2e-5).mean() <= 1e-4, (diffs.max(), (diffs > 2e-5).sum())
