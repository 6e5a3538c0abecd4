"""The SFT train step: a hand-computed AdamW update, exact accumulation, the non-finite guard."""
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from klong_jax.models import init_model, preset
from klong_jax.training.optimizer import decay_mask, make_optimizer, learning_rate_schedule
from klong_jax.training.state import split_model
from klong_jax.training.step import forward_sums, train_step

CFG = preset("tiny", compute_dtype="float32", vocab_size=64, hidden_size=32, num_hidden_layers=2, n_routed_experts=4,
             num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64,
             moe_intermediate_size=16)
OPT = ConfigDict(dict(lr=1e-2, warmup_steps=1, final_lr_fraction=0.1, b1=0.9, b2=0.95, eps=1e-3,
                      weight_decay=0.1, clip_norm=0.5))


def _batch(B=4, T=24, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, (B, T + 1))
    loss_mask = (rng.random((B, T)) < 0.6).astype(np.int32)
    doc = np.ones((B, T), np.int32)
    doc[0, 18:] = 2          # two documents packed in row 0
    doc[1, 20:] = 0          # padding at the end of row 1
    loss_mask[1, 20:] = 0
    return {"input_ids": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
            "loss_mask": jnp.asarray(loss_mask), "positions": jnp.asarray(np.tile(np.arange(T), (B, 1))),
            "doc_ids": jnp.asarray(doc), "window_ids": jnp.zeros((B, T), jnp.int32)}


def _setup():
    graphdef, params, rest = split_model(init_model(CFG, seed=1))
    tx = make_optimizer(OPT, total_steps=10)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    return graphdef, rest, tx, state


def _step(graphdef, rest, tx, state, batch, micro=1):
    return jax.jit(lambda s, b: train_step(s, rest, b, graphdef=graphdef, tx=tx, micro_batches=micro,
                                           z_loss_weight=0.0, lr_schedule=learning_rate_schedule(OPT, 10)))(state, batch)


def test_two_steps_equal_hand_computed_adamw():
    graphdef, rest, tx, state = _setup()
    batch = _batch()
    p0 = jax.tree.map(np.asarray, state["params"])

    def loss(p):
        s = forward_sums(graphdef, p, rest, batch)
        return s["loss_sum"] / s["tokens"]
    g = jax.tree.map(np.asarray, jax.grad(loss)(state["params"]))
    norm = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in jax.tree.leaves(g)))
    g = jax.tree.map(lambda x: x * min(1.0, OPT.clip_norm / norm), g)  # global-norm clipping

    state, m1 = _step(graphdef, rest, tx, state, batch)   # lr(0) = 0: moments move, params do not
    state, m2 = _step(graphdef, rest, tx, state, batch)   # same params, same batch -> same gradient
    lr1 = float(learning_rate_schedule(OPT, 10)(1))
    b1, b2, eps = OPT.b1, OPT.b2, OPT.eps
    mask = decay_mask(p0)

    def expected(p, gr, decay):
        m = b1 * (1 - b1) * gr + (1 - b1) * gr
        v = b2 * (1 - b2) * gr ** 2 + (1 - b2) * gr ** 2
        mhat, vhat = m / (1 - b1 ** 2), v / (1 - b2 ** 2)
        return p - lr1 * (mhat / (np.sqrt(vhat) + eps) + (OPT.weight_decay * p if decay else 0.0))
    want = jax.tree.map(expected, p0, g, mask)
    got = jax.tree.map(np.asarray, state["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got, want)  # 1e-6 << lr1 = 5e-3
    assert int(state["step"]) == 2 and float(m1["lr"]) == 0.0
    np.testing.assert_allclose(float(m1["loss"]), float(loss(jax.tree.map(jnp.asarray, p0))), rtol=1e-6)
    assert not any(mask["norm"].values()) and not mask["dense_layers"]["self_attn"]["q_bias"]


def test_accumulation_equals_one_big_batch():
    graphdef, rest, tx, state = _setup()
    batch = _batch(B=8, seed=3)
    results = [_step(graphdef, rest, tx, jax.tree.map(jnp.copy, state), batch, micro=m) for m in (1, 2, 4)]
    for s, m in results[1:]:
        np.testing.assert_allclose(float(m["loss"]), float(results[0][1]["loss"]), rtol=1e-6)
        np.testing.assert_allclose(float(m["grad_norm"]), float(results[0][1]["grad_norm"]), rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     s["params"], results[0][0]["params"])


def test_nonfinite_step_is_not_applied():
    graphdef, rest, tx, state = _setup()
    state["params"]["norm"]["weight"] = state["params"]["norm"]["weight"].at[0].set(jnp.nan)
    before = jax.tree.map(np.asarray, state)
    after, metrics = _step(graphdef, rest, tx, state, _batch())
    assert int(metrics["nonfinite"]) == 1 and int(after["step"]) == 0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), jax.tree.map(np.asarray, after), before)


def test_loss_normalised_by_global_loss_tokens():
    graphdef, rest, tx, state = _setup()
    batch = _batch()
    _, metrics = _step(graphdef, rest, tx, state, batch)
    sums = forward_sums(graphdef, state["params"], rest, batch)
    assert float(metrics["loss_tokens"]) == float(np.sum(np.asarray(batch["loss_mask"])))
    np.testing.assert_allclose(float(metrics["loss"]), float(sums["loss_sum"] / sums["tokens"]), rtol=1e-6)


def test_chunked_loss_equals_whole_row_loss_and_grads():
    graphdef, rest, _, state = _setup()
    batch = _batch(T=24)
    f = lambda chunk: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda p: forward_sums(graphdef, p, rest, batch, 0.0, chunk)["loss_sum"]))(state["params"])
    (l0, g0), (l7, g7) = f(0), f(7)   # 7 does not divide 24: the tail chunk is padded
    np.testing.assert_allclose(float(l7), float(l0), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g7, g0)  # grads are O(1)
