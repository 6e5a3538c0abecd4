"""What trains (klong_jax/training/trainable.py): the config and its errors, the partition of the stacked layers,
the optimizer state of the trainable subset only, restricted SFT and RL steps equal to full steps with the
frozen gradients and updates zeroed, no backward pass below the lowest trainable layer, checkpoints of the
full params, the weight sync of a subset, and one config section for SFT and every RL stage."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from klong_jax.models import init_model, preset
from klong_jax.rl.step import old_logprobs, rl_update
from klong_jax.training.optimizer import learning_rate_schedule, make_optimizer
from klong_jax.training.state import split_model
from klong_jax.training.step import forward_sums, train_step
from klong_jax.training.trainable import (TrainableConfig, bind_model, param_count, plan_for, trainable_config_from)

# 2 dense layers then 2 MoE layers (untied lm_head), so top-N cuts the MoE stack (N = 1), falls on the stack
# boundary (N = 2) or cuts the dense stack (N = 3).
CFG = preset("tiny", compute_dtype="float32", vocab_size=64, hidden_size=32, num_hidden_layers=4,
             first_k_dense_replace=2, n_routed_experts=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
             intermediate_size=64, moe_intermediate_size=16)
OPT = ConfigDict(dict(lr=1e-2, warmup_steps=1, final_lr_fraction=0.1, b1=0.9, b2=0.95, eps=1e-3,
                      weight_decay=0.1, clip_norm=0.05))   # clip_norm below the gradient norm: clipping is active
RL = ConfigDict(dict(eps_low=0.2, eps_high=0.28, kl_coef=0.05, tis_cap=2.0, routing_replay=True))


def _strict(fn):
    """Arrays the tests build are built with jax_numpy_rank_promotion='raise' (no silent broadcasting)."""
    def wrapped(*a, **k):
        with jax.numpy_rank_promotion("raise"):
            return fn(*a, **k)
    return wrapped


@_strict
def _batch(B=4, T=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, (B, T + 1))
    loss_mask = (rng.random((B, T)) < 0.7).astype(np.int32)
    doc = np.ones((B, T), np.int32)
    doc[0, 10:] = 2
    return {"input_ids": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
            "loss_mask": jnp.asarray(loss_mask), "positions": jnp.asarray(np.tile(np.arange(T), (B, 1))),
            "doc_ids": jnp.asarray(doc), "window_ids": jnp.zeros((B, T), jnp.int32)}


def _model():
    return split_model(init_model(CFG, seed=1))


def _layer_params(params, stack):
    return param_count(params[stack]) // jax.tree.leaves(params[stack])[0].shape[0]


# ---------------------------------------------------------------------------------------------------------
# Config


def test_config_errors_name_the_field_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"trainable.top_layers=-1 must be >= 0 \(0 = every parameter"):
        TrainableConfig(top_layers=-1)
    with pytest.raises(ValueError, match=r"trainable.top_layers='4' must be an integer"):
        TrainableConfig(top_layers="4")
    with pytest.raises(ValueError, match=r"trainable.embeddings=True needs trainable.top_layers > 0"):
        TrainableConfig(embeddings=True)
    with pytest.raises(ValueError, match=r"unknown fields \['top'\]; valid: \['embeddings', 'top_layers'\]"):
        trainable_config_from({"top": 2})
    with pytest.raises(ValueError, match=r"trainable.top_layers=5 exceeds the model's 4 decoder layers; use at most 4"):
        plan_for(TrainableConfig(top_layers=5), CFG)
    with pytest.raises(ValueError, match=r"expected 'all', 'top:N' or 'top:N\+embeddings'"):
        TrainableConfig.from_spec("top:x")
    assert trainable_config_from(None) == TrainableConfig() and TrainableConfig().all
    for spec in ("all", "top:3", "top:2+embeddings"):
        assert TrainableConfig.from_spec(spec).spec() == spec


def test_one_trainable_section_for_sft_and_every_rl_stage():
    from configs.klong import get_config as klong_config
    from configs.rl_common import rl_config
    from configs.sft import TRAINABLE, VARIANTS
    from configs.sft import get_config as sft_config
    for variant in VARIANTS:   # each variant's row of the table (smol: the top 8 layers; the others: everything)
        assert trainable_config_from(sft_config(variant).trainable).top_layers == TRAINABLE[variant]["top_layers"]
        assert rl_config(1, variant).trainable.to_dict() == sft_config(variant).trainable.to_dict()
    c = klong_config("tiny")
    c.sft.trainable.top_layers = 2          # what --config.sft.trainable.top_layers=2 does
    assert all(c[f"rl_stage{s}"].trainable.top_layers == 2 for s in (1, 2, 3))


# ---------------------------------------------------------------------------------------------------------
# Partition and optimizer state


@pytest.mark.parametrize("spec,cut,frozen_keys", [
    ("top:1", {"dense_layers": 2, "moe_layers": 1}, {"embed_tokens", "lm_head", "dense_layers", "moe_layers"}),
    ("top:2", {"dense_layers": 2, "moe_layers": 0}, {"embed_tokens", "lm_head", "dense_layers"}),
    ("top:3", {"dense_layers": 1, "moe_layers": 0}, {"embed_tokens", "lm_head", "dense_layers"}),
    ("top:4", {"dense_layers": 0, "moe_layers": 0}, {"embed_tokens", "lm_head"}),
    ("top:3+embeddings", {"dense_layers": 1, "moe_layers": 0}, {"dense_layers"}),
])
def test_partition_and_optimizer_state_of_the_trainable_params_only(spec, cut, frozen_keys):
    _, params, _ = _model()
    plan = plan_for(TrainableConfig.from_spec(spec), CFG)
    assert dict(plan.cut) == cut
    trainable, frozen = plan.split(params)
    assert set(frozen) == frozen_keys
    # Trainable count by hand: top N layers (MoE layers first from the top) + final norm (+ embeddings).
    n = TrainableConfig.from_spec(spec).top_layers
    dense, moe = _layer_params(params, "dense_layers"), _layer_params(params, "moe_layers")
    want = min(n, 2) * moe + max(n - 2, 0) * dense + CFG.hidden_size
    if spec.endswith("+embeddings"):
        want += 2 * CFG.vocab_size * CFG.hidden_size
    assert param_count(trainable) == want and param_count(trainable) + param_count(frozen) == param_count(params)
    # Adam's mu and nu exist for the trainable params alone: 2 x their count (+ the two int32 step counts).
    opt_state = make_optimizer(OPT, 10).init(trainable)
    assert param_count(opt_state) == 2 * want + 2
    merged = plan.merge(trainable, frozen)
    jax.tree.map(np.testing.assert_array_equal, merged, params)


def test_every_parameter_training_is_the_historical_step_bit_for_bit():
    graphdef, params, rest = _model()
    plan = plan_for(TrainableConfig(), CFG)
    trainable, frozen = plan.split(params)
    assert trainable is params and frozen == {}
    tx, batch = make_optimizer(OPT, 10), _batch()
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    kw = dict(graphdef=graphdef, tx=tx, micro_batches=1, z_loss_weight=0.0, lr_schedule=learning_rate_schedule(OPT, 10))
    old = jax.make_jaxpr(lambda s, b: train_step(s, rest, b, **kw))(state, batch)
    new = jax.make_jaxpr(lambda s, b, f: train_step(s, rest, b, f, plan=plan, **kw))(state, batch, frozen)
    assert str(old) == str(new)   # the same program: the same numbers


def test_stack_pieces_equal_the_unsplit_stacks():
    """The model run over [bottom, top] pieces of each stack (forced routing sliced per piece) gives the unsplit
    model's logits and routing."""
    graphdef, params, rest = _model()
    batch = _batch()
    model, _ = bind_model(graphdef, params, rest)
    logits, routed = model(batch["input_ids"], positions_BT=batch["positions"], return_routing=True)
    for n in (1, 3):
        plan = plan_for(TrainableConfig(top_layers=n), CFG)
        trainable, frozen = plan.split(params)
        cut_model, pieces = plan.bind(graphdef, trainable, frozen, rest)
        assert [len(p) for p in pieces.values()] == [2]
        got, got_routed = cut_model(batch["input_ids"], positions_BT=batch["positions"], return_routing=True,
                                    stack_pieces=pieces, forced_experts_LBTX=routed)
        np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got_routed, routed)


# ---------------------------------------------------------------------------------------------------------
# Restricted steps equal masked full steps


@_strict
def _masked_reference_tx(plan, params):
    """Full training restricted to the plan's parameters: frozen gradients zeroed before the optimizer (so
    clipping sees ||g_trainable||), frozen updates zeroed after it (so weight decay never moves them)."""
    trainable, frozen = plan.split(params)
    mask = plan.merge(jax.tree.map(jnp.ones_like, trainable), jax.tree.map(jnp.zeros_like, frozen))
    zero_frozen = optax.stateless(lambda u, _p: jax.tree.map(jnp.multiply, u, mask))
    return optax.chain(zero_frozen, make_optimizer(OPT, 10), zero_frozen)


def _run(step_fn, tx, params, steps, frozen=None):
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    metrics = []
    for i in range(steps):
        state, m = step_fn(state, _batch(seed=i), frozen)
        metrics.append(m)
    return state, metrics


@pytest.mark.parametrize("spec", ["top:1", "top:3", "top:2+embeddings"])
def test_sft_restricted_steps_equal_full_steps_with_frozen_gradients_zeroed(spec):
    graphdef, params, rest = _model()
    plan = plan_for(TrainableConfig.from_spec(spec), CFG)
    kw = dict(graphdef=graphdef, micro_batches=2, z_loss_weight=0.0, lr_schedule=learning_rate_schedule(OPT, 10))
    tx, tx_ref = make_optimizer(OPT, 10), _masked_reference_tx(plan, params)
    restricted = jax.jit(lambda s, b, f: train_step(s, rest, b, f, tx=tx, plan=plan, **kw))
    full = jax.jit(lambda s, b, f: train_step(s, rest, b, tx=tx_ref, **kw))
    trainable, frozen = plan.split(params)
    got, m_got = _run(restricted, tx, trainable, 3, frozen)
    want, m_want = _run(full, tx_ref, params, 3)
    for a, b in zip(m_got, m_want):
        # The same loss. The restricted step's norm is ||g_trainable||: above clip_norm (clipping is active, on
        # that norm in both runs) and below the full run's reported ||g|| over every parameter.
        np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-6)
        assert OPT.clip_norm < float(a["grad_norm"]) < float(b["grad_norm"])
    merged = plan.merge(got["params"], frozen)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), merged, want["params"])
    # Frozen params did not move in either; every trainable one moved (lr(0) = 0, then two updates of <= lr each).
    _, want_frozen = plan.split(want["params"])
    jax.tree.map(np.testing.assert_array_equal, want_frozen, frozen)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), got["params"], trainable))
    assert min(moved) > 0 and max(moved) <= 2 * OPT.lr * (1 + OPT.weight_decay)


def _rl_batch(graphdef, params, rest):
    """An RL batch on the model's own routing: sampler log-probs = the trainer's + noise (ratios != 1),
    advantages of both signs."""
    b = _batch(B=4, T=16, seed=7)
    model, _ = bind_model(graphdef, params, rest)
    _, routed_LBTK = model(b["input_ids"], positions_BT=b["positions"], doc_ids_BT=b["doc_ids"], return_routing=True)
    batch = {k: b[k] for k in ("input_ids", "targets", "positions", "doc_ids", "window_ids")}
    batch["routed"] = jnp.transpose(routed_LBTK, (1, 2, 0, 3))
    batch["rl_mask"] = b["loss_mask"]
    logp, _ = old_logprobs(params, rest, batch, graphdef=graphdef)
    with jax.numpy_rank_promotion("raise"):
        rng = np.random.default_rng(3)
        batch["old_logprobs"] = logp
        batch["sampler_logprobs"] = logp + jnp.asarray(rng.normal(0, 0.1, logp.shape), jnp.float32)
        batch["advantages"] = jnp.asarray(np.repeat(np.array([[1.0], [-1.0], [1.0], [-1.0]]), 16, axis=1),
                                          jnp.float32)
    return batch


@pytest.mark.parametrize("spec", ["top:1", "top:3"])
def test_rl_restricted_updates_equal_full_updates_with_frozen_gradients_zeroed(spec):
    graphdef, params, rest = _model()
    plan = plan_for(TrainableConfig.from_spec(spec), CFG)
    batch = _rl_batch(graphdef, params, rest)
    kw = dict(graphdef=graphdef, rl_cfg=RL, lr_schedule=learning_rate_schedule(OPT, 10))
    tx, tx_ref = make_optimizer(OPT, 10), _masked_reference_tx(plan, params)
    trainable, frozen = plan.split(params)
    ref_t = jax.tree.map(jnp.copy, trainable)        # the KL reference: stage-start trainable params
    restricted = jax.jit(lambda s, f: rl_update(s, rest, ref_t, batch, f, tx=tx, plan=plan, **kw))
    full = jax.jit(lambda s: rl_update(s, rest, params, batch, tx=tx_ref, **kw))
    got = {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.zeros((), jnp.int32)}
    want = {"params": params, "opt_state": tx_ref.init(params), "step": jnp.zeros((), jnp.int32)}
    for _ in range(3):
        got, m_got = restricted(got, frozen)
        want, m_want = full(want)
        np.testing.assert_allclose(float(m_got["loss"]), float(m_want["loss"]), rtol=1e-5, atol=1e-7)
        assert 0 < float(m_got["grad_norm"]) < float(m_want["grad_norm"])   # ||g_trainable|| < ||g||
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 plan.merge(got["params"], frozen), want["params"])


# ---------------------------------------------------------------------------------------------------------
# No backward pass below the lowest trainable layer


def _reverse_scan_lengths(jaxpr):
    """Lengths of the reverse scans (the transposed layer loops of the backward pass), recursively."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan" and eqn.params["reverse"]:
            out.append(eqn.params["length"])
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (list, tuple)) else [value]):
                sub = getattr(sub, "jaxpr", sub)          # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    out += _reverse_scan_lengths(sub)
    return out


@pytest.mark.parametrize("spec,backward_layers", [("all", [2, 2]), ("top:1", [1]), ("top:2", [2]),
                                                  ("top:3", [1, 2]), ("top:3+embeddings", [1, 1, 2])])
def test_the_backward_pass_covers_only_the_trainable_layers(spec, backward_layers):
    """The gradient's transposed layer scans: all 4 layers (2 dense + 2 MoE) when everything trains, only the top
    N otherwise. With the embeddings trained, the activation cotangent must reach the input lookup: the frozen
    bottom piece (1 dense layer) is transposed too."""
    graphdef, params, rest = _model()
    plan = plan_for(TrainableConfig.from_spec(spec), CFG)
    trainable, frozen = plan.split(params)
    batch = _batch()
    loss = lambda t: forward_sums(graphdef, t, rest, batch, frozen=frozen, plan=plan)["loss_sum"]  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable)
    assert sorted(_reverse_scan_lengths(jaxpr.jaxpr)) == backward_layers


# ---------------------------------------------------------------------------------------------------------
# Checkpoints, resume, weight sync


def test_checkpoint_holds_the_full_params_and_resumes(tmp_path, devices):
    from klong_jax.sharding import make_mesh
    from klong_jax.training.checkpoint import Checkpointer, abstract_with_shardings
    from klong_jax.training.state import abstract_layout, load_trained_model
    from klong_jax.training.trainable import train_layout
    mesh = make_mesh({"fsdp": 8})
    plan = plan_for(TrainableConfig(top_layers=3), CFG)
    tx = make_optimizer(OPT, 10)
    graphdef, abs_params, abs_rest, param_sh, rest_sh = abstract_layout(CFG, mesh)
    layout = train_layout(plan, abs_params, param_sh, tx, mesh)
    _, params, rest = _model()
    with jax.set_mesh(mesh):
        state, frozen = layout.initial(params, tx)
        rest = jax.device_put(rest, rest_sh)
        step = jax.jit(lambda s, r, b, f: train_step(s, r, b, f, graphdef=graphdef, tx=tx, micro_batches=1,
                                                     z_loss_weight=0.0, lr_schedule=learning_rate_schedule(OPT, 10),
                                                     plan=plan))
        state, _ = step(state, rest, _batch(B=8), frozen)
        ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
        ckpt.save(1, {"train": layout.checkpoint_state(state, frozen), "rest": rest},
                  meta={"step": 1, "trainable": plan.config.spec()}, force=True)
        ckpt.wait()
        # Resume: the full params are split again, the optimizer state is the trainable subset's.
        target = {"train": layout.abstract_checkpoint_state(tx), "rest": abstract_with_shardings(abs_rest, rest_sh)}
        layout.check_meta(ckpt.meta(1), "step 1")
        restored, _ = ckpt.restore(1, target)
        state2, frozen2 = layout.from_checkpoint(restored["train"])
        jax.tree.map(np.testing.assert_array_equal, state2, state)
        jax.tree.map(np.testing.assert_array_equal, frozen2, frozen)
        # Another setting is refused with the reason (its optimizer state covers other parameters).
        other = train_layout(plan_for(TrainableConfig(), CFG), abs_params, param_sh, tx, mesh)
        with pytest.raises(ValueError, match=r"trained with trainable=top:3, but config.trainable says all"):
            other.check_meta(ckpt.meta(1), "step 1")
        ckpt.close()
        # Evaluation / the next stage read the full model unchanged.
        model, at = load_trained_model(str(tmp_path), CFG, mesh)
        full = jax.tree.map(np.asarray, plan.merge(state["params"], frozen))
        _, loaded, _ = split_model(model)
        assert at == 1
        jax.tree.map(np.testing.assert_array_equal, loaded, full)


def test_weight_sync_sends_the_trained_variables_only():
    """Sampler.update_params takes the plan's subset: the variables that train, a cut stack whole."""
    from klong_jax.sampling import Sampler
    from flax import nnx
    graphdef, params, rest = _model()
    plan = plan_for(TrainableConfig(top_layers=3), CFG)
    trainable, frozen = plan.split(params)
    trainable = jax.tree.map(lambda a: a + 1.0, trainable)     # "after an update"
    sent = plan.sync_params(trainable, frozen)
    assert set(sent) == {"dense_layers", "moe_layers", "norm"}     # no embed_tokens / lm_head
    assert jax.tree.leaves(sent["dense_layers"])[0].shape[0] == 2   # the cut dense stack goes whole
    sampler = Sampler(init_model(CFG, seed=1), None, None)
    sampler.update_params(sent)
    current = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(sampler.state))[0])
    for path, value in jax.tree_util.tree_flatten_with_path(plan.merge(trainable, frozen))[0]:
        np.testing.assert_array_equal(current[path], value)   # trained ones updated, frozen ones as they were


def test_sft_run_trains_the_top_layer_checkpoints_full_params_and_resumes_bitwise(tmp_path):
    """launch/train.py with --config.trainable.top_layers=1 on a 1 dense + 1 MoE layer model: the checkpoints
    hold the full params (the dense layer and the embeddings as they were, the MoE layer moved); a run resumed
    from step 2 ends bitwise equal to the uninterrupted one; resuming with another setting is refused."""
    import os
    import shutil
    from sft_helpers import make_data, run_train
    from test_sft_run import read_checkpoint
    data = make_data(str(tmp_path / "data"))
    workdir = str(tmp_path / "run")
    extra = {"trainable.top_layers": 1, "train.steps": 4, "train.eval_every": 4}
    run_train(workdir, data, **extra)
    s2, s4 = read_checkpoint(workdir, 2), read_checkpoint(workdir, 4)
    for key in s4:
        if key.startswith("/train/params/"):
            frozen = key.startswith(("/train/params/dense_layers/", "/train/params/embed_tokens",
                                     "/train/params/lm_head"))
            assert np.array_equal(s2[key], s4[key]) == frozen, key
    assert not any("dense_layers" in k or "embed_tokens" in k for k in s4 if k.startswith("/train/opt_state/"))
    # Resume: drop step 4, rerun the same command from step 2.
    shutil.copytree(os.path.join(workdir, "checkpoints", "4"), str(tmp_path / "step4"))
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    out = run_train(workdir, data, **extra)
    assert "resumed from step 2" in out.stdout
    again = read_checkpoint(workdir, 4)
    assert set(again) == set(s4)
    for key in s4:
        np.testing.assert_array_equal(again[key], s4[key], err_msg=key)
    refused = run_train(workdir, data, check=False, **{**extra, "trainable.top_layers": 0, "train.steps": 6})
    assert refused.returncode != 0
    assert "trained with trainable=top:1, but config.trainable says all" in refused.stderr + refused.stdout


def test_rl_fns_with_a_plan_on_the_mesh(devices):
    """The RL loop's jit'd functions with a plan (top 3 of 4 layers: the dense stack cut) on the 8-device mesh:
    the old log-probs are the full model's, and the update equals the unjitted restricted update."""
    from klong_jax.rl.step import jit_rl_fns
    from klong_jax.sharding import make_mesh
    from klong_jax.training.state import abstract_layout
    from klong_jax.training.trainable import train_layout
    mesh = make_mesh({"fsdp": 8})
    graphdef, params, rest = _model()
    batch = _rl_batch(graphdef, params, rest)
    plan = plan_for(TrainableConfig(top_layers=3), CFG)
    tx, lr = make_optimizer(OPT, 10), learning_rate_schedule(OPT, 10)
    trainable, frozen = plan.split(params)
    want, _ = rl_update({"params": trainable, "opt_state": tx.init(trainable), "step": jnp.zeros((), jnp.int32)},
                        rest, trainable, batch, frozen, graphdef=graphdef, tx=tx, rl_cfg=RL, lr_schedule=lr, plan=plan)
    _, abs_params, _, param_sh, rest_sh = abstract_layout(CFG, mesh)
    layout = train_layout(plan, abs_params, param_sh, tx, mesh)
    update_fn, old_fn = jit_rl_fns(graphdef, tx, RL, lr, layout.state_sh, rest_sh, mesh, plan=plan,
                                   frozen_sh=layout.frozen_sh)
    with jax.set_mesh(mesh):
        state, frozen_dev = layout.initial(params, tx)
        rest_dev = jax.device_put(rest, rest_sh)
        with_replay, _ = old_fn(state["params"], rest_dev, batch, frozen_dev)
        np.testing.assert_allclose(with_replay, batch["old_logprobs"], rtol=1e-5, atol=1e-5)
        ref = jax.tree.map(jnp.copy, state["params"])
        state, m = update_fn(state, rest_dev, ref, batch, frozen_dev)
    assert int(m["nonfinite"]) == 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state["params"], want["params"])
