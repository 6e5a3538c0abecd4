"""Shared-prefix packing at the model level: loss and parameter gradients of one packed row
[prefix][w1][w2][w3] equal the sums over the separate rows [prefix][wi] (fp32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klong_jax.models import init_model, preset
from klong_jax.training.loss import masked_sums

CFG = preset("tiny", compute_dtype="float32", vocab_size=128, hidden_size=64, num_hidden_layers=2, n_routed_experts=4)
PREFIX, WINDOWS = 40, (23, 31, 17)


def _rows():
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, CFG.vocab_size, PREFIX)
    windows = [rng.integers(0, CFG.vocab_size, n + 1) for n in WINDOWS]  # +1: the last token's target
    separate = []
    for w in windows:
        ids = np.concatenate([prefix, w[:-1]])
        tgt = np.concatenate([prefix[1:], w])
        mask = np.concatenate([np.zeros(PREFIX), np.ones(len(w) - 1)])
        separate.append(dict(input_ids=ids, targets=tgt, loss_mask=mask, positions=np.arange(len(ids)),
                             doc_ids=np.ones(len(ids)), window_ids=np.zeros(len(ids))))
    packed = {k: [separate[0][k][:PREFIX]] for k in separate[0]}
    packed["window_ids"] = [np.zeros(PREFIX)]
    for k, (row, w) in enumerate(zip(separate, windows), start=1):
        for key in row:
            if key != "window_ids":
                packed[key].append(row[key][PREFIX:])
        packed["window_ids"].append(np.full(len(w) - 1, k))
    packed = {k: np.concatenate(v)[None].astype(np.int32) for k, v in packed.items()}
    separate = [{k: v[None].astype(np.int32) for k, v in r.items()} for r in separate]
    return packed, separate


@pytest.mark.parametrize("impl", ["reference", "blockwise", "pallas"])
def test_packed_shared_prefix_equals_separate_windows(impl):
    graphdef, params, rest = nnx.split(init_model(CFG.replace(attention_impl=impl), seed=0), nnx.Param, ...)
    packed, separate = _rows()
    assert packed["positions"][0, PREFIX] == PREFIX and packed["positions"][0, PREFIX + WINDOWS[0]] == PREFIX

    def loss(p, b):
        logits = nnx.merge(graphdef, p, rest)(b["input_ids"], positions_BT=b["positions"], doc_ids_BT=b["doc_ids"],
                                              window_ids_BT=b["window_ids"])
        return masked_sums(logits, b["targets"], b["loss_mask"])["loss_sum"]

    grad_fn = jax.jit(jax.value_and_grad(loss))
    packed_loss, packed_grad = grad_fn(params, packed)
    sep = [grad_fn(params, r) for r in separate]
    sep_loss = sum(float(l) for l, _ in sep)
    sep_grad = jax.tree.map(lambda *g: sum(g), *[g for _, g in sep])
    np.testing.assert_allclose(float(packed_loss), sep_loss, rtol=1e-5)
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(sep_grad))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale), packed_grad, sep_grad)
