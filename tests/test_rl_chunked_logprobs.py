"""RL log-probs made `loss_chunk` tokens at a time (rl/objective.py chunked_token_logprobs; rl.loss_chunk): the
same log-probs, entropies and gradients as the whole-row [B, T, V] pass, for a chunk that divides T and one that
does not, through routing replay, a trainable plan and the KL reference pass; no [B, T, V] array is ever live;
the config field is range-checked."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import rl_common
from klong_jax.models import init_model, preset
from klong_jax.rl.config import RLConfig
from klong_jax.rl.objective import chunked_token_logprobs
from klong_jax.rl.step import old_logprobs, rl_grads, token_logprobs
from klong_jax.training.state import split_model
from klong_jax.training.trainable import TrainableConfig, bind_model, plan_for

# 1 dense layer then 2 MoE layers, untied lm_head. V = 80 differs from every other width of the model (D = 32,
# dense FFN 64, expert FFN 16, 4 experts), so a [.., .., 80] array in a jaxpr is a logits array.
CFG = preset("tiny", compute_dtype="float32", vocab_size=80, hidden_size=32, num_hidden_layers=3,
             first_k_dense_replace=1, n_routed_experts=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
             intermediate_size=64, moe_intermediate_size=16)
B, T, V = 4, 16, 80
# A chunk that divides T (16 = 4 x 4: 4 chunks, no padding) and one that does not (16 = 3 x 5 + 1: padded by
# (-16) % 5 = 4 to 20 = 4 x 5, 4 chunks, the 4 padded tokens cut off).
CHUNKS = ((4, 4), (5, 4))   # (chunk, chunks in the scan)
TEMPERATURE = 0.7
ATOL = 1e-5


def _model():
    return split_model(init_model(CFG, seed=3))


def _rl_batch(graphdef, params, rest):
    """Random rows with a document boundary, a routing to replay that is not the model's own (each of its experts
    shifted by one: a sampler that routed differently, so replay changes the numbers), sampler / old log-probs = the
    trainer's + noise (ratios != 1), advantages of both signs, ~70% of tokens trained. Arrays built here are built
    under jax_numpy_rank_promotion='raise' (no silent broadcasting; the model's own calls run outside it)."""
    rng = np.random.default_rng(11)
    with jax.numpy_rank_promotion("raise"):
        ids = rng.integers(0, V, (B, T + 1))
        doc = np.ones((B, T), np.int32)
        doc[1, 9:] = 2
        batch = {"input_ids": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
                 "positions": jnp.asarray(np.tile(np.arange(T), (B, 1))), "doc_ids": jnp.asarray(doc),
                 "window_ids": jnp.zeros((B, T), jnp.int32)}

    @jax.jit
    def routing(p, b):
        model, _ = bind_model(graphdef, p, rest)
        _, routed_LBTK = model(b["input_ids"], positions_BT=b["positions"], doc_ids_BT=b["doc_ids"],
                               return_routing=True)
        shifted_LBTK = (routed_LBTK + 1) % CFG.n_routed_experts   # still k distinct experts per token
        return jnp.transpose(shifted_LBTK, (1, 2, 0, 3))   # [B, T, L, k], as rl.batch builds it

    batch["routed"] = routing(params, batch)
    logp, _ = jax.jit(lambda p, b: token_logprobs(graphdef, p, rest, b, routing_replay=True,
                                                  temperature=TEMPERATURE))(params, batch)
    with jax.numpy_rank_promotion("raise"):
        batch["rl_mask"] = jnp.asarray((rng.random((B, T)) < 0.7).astype(np.int32))
        batch["old_logprobs"] = logp
        batch["sampler_logprobs"] = logp + jnp.asarray(rng.normal(0, 0.1, (B, T)), jnp.float32)
        batch["advantages"] = jnp.asarray(np.repeat(np.array([[1.0], [-1.0], [0.5], [-2.0]]), T, axis=1),
                                          jnp.float32)
    return batch


@pytest.fixture(scope="module")
def setup():
    graphdef, params, rest = _model()
    return graphdef, params, rest, _rl_batch(graphdef, params, rest)


@pytest.fixture(scope="module")
def hidden(setup):
    """(the bound model, its final hidden states [B, T, D] on the batch)."""
    graphdef, params, rest, batch = setup

    @jax.jit
    def h(p, b):
        model, _ = bind_model(graphdef, p, rest)
        return model.hidden_states(b["input_ids"], positions_BT=b["positions"], doc_ids_BT=b["doc_ids"],
                                   window_ids_BT=b["window_ids"])[0]

    return bind_model(graphdef, params, rest)[0], h(params, batch)


def _eqns(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (scan bodies, checkpoints, jvp/transpose) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def _logits_sizes(fn, *args):
    """Element counts of every logits-shaped intermediate ([..., V], rank >= 3) of fn(*args)."""
    return [int(np.prod(v.aval.shape)) for e in _eqns(jax.make_jaxpr(fn)(*args).jaxpr) for v in e.outvars
            if len(getattr(v.aval, "shape", ())) >= 3 and v.aval.shape[-1] == V]


def _scan_lengths(fn, *args):
    return [e.params["length"] for e in _eqns(jax.make_jaxpr(fn)(*args).jaxpr) if e.primitive.name == "scan"]


# ---------------------------------------------------------------------------------------------------------
# The function itself


@pytest.mark.parametrize("temperature", (1.0, TEMPERATURE))
@pytest.mark.parametrize("chunk, n_chunks", CHUNKS)
def test_chunked_equals_whole_row(setup, hidden, chunk, n_chunks, temperature):
    batch = setup[3]
    model, h_BTD = hidden
    with jax.numpy_rank_promotion("raise"):
        want_logp, want_ent = chunked_token_logprobs(model.logits, h_BTD, batch["targets"], 0, temperature)
        got_logp, got_ent = chunked_token_logprobs(model.logits, h_BTD, batch["targets"], chunk, temperature)
        # By hand from the full logits: logp = z[target] - logsumexp(z), H = -sum p log p, z = logits / temperature.
        z_BTV = model.logits(h_BTD) / temperature
        logp_BTV = jax.nn.log_softmax(z_BTV, axis=-1)
        hand_logp = jnp.take_along_axis(logp_BTV, batch["targets"][..., None], axis=-1)[..., 0]
        hand_ent = -jnp.sum(jnp.exp(logp_BTV) * logp_BTV, axis=-1)
    for got in (got_logp, got_ent):
        assert got.shape == (B, T) and got.dtype == jnp.float32
    np.testing.assert_allclose(want_logp, hand_logp, atol=ATOL)
    np.testing.assert_allclose(want_ent, hand_ent, atol=ATOL)
    np.testing.assert_allclose(got_logp, want_logp, atol=ATOL)
    np.testing.assert_allclose(got_ent, want_ent, atol=ATOL)
    assert float(jnp.min(got_ent)) > 0 and float(jnp.max(got_ent)) <= np.log(V) + ATOL   # 0 < H <= log 80 = 4.38


def test_chunk_off_or_whole_row_is_the_plain_pass(setup, hidden):
    """chunk <= 0 or >= T: one [B, T, V] pass, no scan; bit-identical to each other."""
    batch = setup[3]
    model, h_BTD = hidden
    ref = chunked_token_logprobs(model.logits, h_BTD, batch["targets"], 0, TEMPERATURE)
    for chunk in (-1, T, T + 3):
        got = chunked_token_logprobs(model.logits, h_BTD, batch["targets"], chunk, TEMPERATURE)
        jax.tree.map(np.testing.assert_array_equal, got, ref)
        assert _scan_lengths(lambda h: chunked_token_logprobs(model.logits, h, batch["targets"], chunk), h_BTD) == []


@pytest.mark.parametrize("chunk, n_chunks", CHUNKS)
def test_no_whole_row_logits_forward_or_backward(setup, hidden, chunk, n_chunks):
    """The memory claim, structurally: in the forward and in the gradient's jaxpr every logits-shaped array
    ([..., V]) holds at most B * chunk * V elements (4 x 4 x 80 = 1,280 or 4 x 5 x 80 = 1,600, against the whole
    row's 4 x 16 x 80 = 5,120), and the scan runs over the number of chunks computed in CHUNKS."""
    batch = setup[3]
    model, h_BTD = hidden
    mask = batch["rl_mask"].astype(jnp.float32)

    def f(h, c):
        logp, ent = chunked_token_logprobs(model.logits, h, batch["targets"], c, TEMPERATURE)
        return jnp.sum(logp * mask) + jnp.sum(ent * mask)

    for fn in (f, jax.grad(f)):
        sizes = _logits_sizes(lambda h: fn(h, chunk), h_BTD)
        assert sizes and max(sizes) <= B * chunk * V
        # The check does see a whole-row array where there is one: 4 x 16 x 80 = 5,120 elements.
        assert max(_logits_sizes(lambda h: fn(h, 0), h_BTD)) == B * T * V
    assert set(_scan_lengths(lambda h: f(h, chunk), h_BTD)) == {n_chunks}


# ---------------------------------------------------------------------------------------------------------
# Through the RL step


def _assert_close(got, want, what):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL, err_msg=what), got, want)


def test_token_logprobs_and_old_logprobs_with_replay_and_plan(setup):
    """token_logprobs keeps routing replay, frozen params and stack pieces (top:1 cuts the MoE stack in two, the
    forced experts are sliced to each piece) working with loss_chunk > 0; old_logprobs (with replay and
    without) passes it on; the same numbers as loss_chunk = 0, for both chunks of CHUNKS."""
    graphdef, params, rest, batch = setup
    plan = plan_for(TrainableConfig.from_spec("top:1"), CFG)
    trainable, frozen = plan.split(params)

    def logprobs(c):
        return jax.jit(lambda p, f: token_logprobs(graphdef, p, rest, batch, routing_replay=True,
                                                   temperature=TEMPERATURE, frozen=f, plan=plan,
                                                   loss_chunk=c))(trainable, frozen)

    def old(c):
        return jax.jit(lambda p: old_logprobs(p, rest, batch, graphdef=graphdef, temperature=TEMPERATURE,
                                              loss_chunk=c))(params)

    want_new, want_old = logprobs(0), old(0)
    # Replay reproduces the old log-probs the batch was built with (replay on, whole row, same params).
    np.testing.assert_allclose(want_new[0], batch["old_logprobs"], atol=ATOL)
    assert float(jnp.abs(want_old[0] - want_old[1]).max()) > 0   # without replay: other experts, other numbers
    for chunk, _ in CHUNKS:
        _assert_close(logprobs(chunk), want_new, f"token_logprobs, loss_chunk={chunk}")
        _assert_close(old(chunk), want_old, f"old_logprobs, loss_chunk={chunk}")


def test_gradient_of_masked_logp_sum(setup):
    graphdef, params, rest, batch = setup
    mask = batch["rl_mask"].astype(jnp.float32)

    def objective(p, c):
        logp, _ = token_logprobs(graphdef, p, rest, batch, routing_replay=True, temperature=TEMPERATURE,
                                 loss_chunk=c)
        return jnp.sum(logp * mask)

    value_and_grad = jax.jit(jax.value_and_grad(objective), static_argnums=1)
    want_v, want_g = value_and_grad(params, 0)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_g)) > 1e-3   # a gradient to compare
    for chunk, _ in CHUNKS:
        got_v, got_g = value_and_grad(params, chunk)
        np.testing.assert_allclose(got_v, want_v, rtol=1e-6)
        _assert_close(got_g, want_g, f"loss_chunk={chunk}")


def test_rl_grads_with_kl_reference_and_plan(setup):
    """The whole RL loss (clipped surrogate, TIS, k3 KL through the reference's own chunked pass, the entropy
    metric) on the trainable subset of a plan: loss, metrics and gradients equal loss_chunk = 0's."""
    graphdef, params, rest, batch = setup
    plan = plan_for(TrainableConfig.from_spec("top:2"), CFG)
    trainable, frozen = plan.split(params)
    ref = jax.tree.map(lambda x: x * 0.98, trainable)   # a reference that differs: k3 > 0
    total = jnp.sum(batch["rl_mask"].astype(jnp.float32))

    def run(c):
        rl_cfg = ConfigDict(dict(eps_low=0.2, eps_high=0.28, kl_coef=0.05, tis_cap=2.0, routing_replay=True,
                                 loss_chunk=c))
        return jax.jit(lambda p, r, f: rl_grads(p, rest, r, batch, total, f, graphdef=graphdef, rl_cfg=rl_cfg,
                                                temperature=TEMPERATURE, plan=plan))(trainable, ref, frozen)

    want_g, want_loss, want_m = run(0)
    assert float(want_m["kl_ref_mean"]) > 0 and float(want_m["entropy"]) > 0
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_g)) > 1e-4
    for chunk, _ in CHUNKS:
        got_g, got_loss, got_m = run(chunk)
        np.testing.assert_allclose(got_loss, want_loss, atol=ATOL)
        for k in want_m:
            np.testing.assert_allclose(got_m[k], want_m[k], atol=ATOL, err_msg=f"{k}, loss_chunk={chunk}")
        _assert_close(got_g, want_g, f"loss_chunk={chunk}")


# ---------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("value", (-1, True, 2.5))
def test_config_rejects_bad_loss_chunk(value):
    base = dict(rl_common.rl_config(1, "tiny").rl.items())
    with pytest.raises(ValueError, match=r"rl\.loss_chunk=.* must be an integer >= 0 \(tokens per logits chunk"):
        RLConfig.from_mapping({**base, "loss_chunk": value})
    assert RLConfig.from_mapping({**base, "loss_chunk": 0}).loss_chunk == 0   # 0: off, legal


def test_shipped_loss_chunks():
    """Off for the CPU variants; 2048 for the large ones, which divides their rows (glm45_air: 131072 = 64 x 2048;
    small: 8192 = 4 x 2048), so no chunk is padding."""
    assert RLConfig(steps=1, tasks_per_step=1, group_size=2).loss_chunk == 0   # the default: off
    for variant, want in (("tiny", 0), ("smol", 0), ("small", 2048), ("glm45_air", 2048)):
        for stage in (1, 2, 3):
            rl = RLConfig.from_mapping(rl_common.rl_config(stage, variant).rl)
            assert rl.loss_chunk == want
            assert want == 0 or rl.seq_len % want == 0
