"""Model behaviour beyond HF parity: MoE dispatch paths, routing replay, remat/scan, shardings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klong_jax.models import count_params, init_model, preset
from klong_jax.models.moe import experts_dense, experts_ragged, route
from klong_jax.sharding import make_mesh

CFG = preset("tiny", compute_dtype="float32", vocab_size=256, max_position_embeddings=512)


def _ids(B=2, T=16, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, CFG.vocab_size)


def test_ragged_dispatch_equals_dense_reference():
    key = jax.random.split(jax.random.key(1), 5)
    N, D, E, F, K = 40, 16, 8, 12, 3
    x = jax.random.normal(key[0], (N, D))
    wg, wu = jax.random.normal(key[1], (E, D, F)), jax.random.normal(key[2], (E, D, F))
    wd = jax.random.normal(key[3], (E, F, D))
    cfg = CFG.replace(n_routed_experts=E, num_experts_per_tok=K)
    experts, weights = route(x, jax.random.normal(key[4], (D, E)), jnp.zeros(E), cfg)
    np.testing.assert_allclose(experts_ragged(x, experts, weights, wg, wu, wd),
                               experts_dense(x, experts, weights, wg, wu, wd), rtol=1e-5, atol=1e-4)


def test_group_limited_routing_picks_only_from_kept_groups():
    cfg = CFG.replace(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    x = jax.random.normal(jax.random.key(2), (64, 8))
    experts, weights = route(x, jax.random.normal(jax.random.key(3), (8, 8)), jnp.zeros(8), cfg)
    assert len(set(np.unique(experts // 2).tolist())) > 2   # different tokens keep different groups
    for row in np.asarray(experts // 2):
        assert len(set(row.tolist())) <= 2                  # but each token uses at most topk_group groups
    np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, rtol=1e-6)


def test_router_bias_only_chooses():
    cfg = CFG.replace(n_routed_experts=8, num_experts_per_tok=2, norm_topk_prob=False)
    x = jax.random.normal(jax.random.key(4), (8, 8))
    W = jax.random.normal(jax.random.key(5), (8, 8))
    bias = jnp.zeros(8).at[7].set(100.0)
    experts, weights = route(x, W, bias, cfg)
    assert (experts == 7).any(axis=1).all()
    np.testing.assert_allclose(weights[experts == 7], jax.nn.sigmoid(x @ W)[:, 7], rtol=1e-6)


def test_moe_dense_impl_matches_ragged_in_full_model():
    ids = _ids()
    ragged = init_model(CFG)
    dense = init_model(CFG.replace(moe_impl="dense"))
    np.testing.assert_allclose(ragged(ids), dense(ids), atol=2e-5)


def test_routing_replay_reproduces_logits_and_forces_experts():
    model = init_model(CFG)
    ids = _ids()
    logits, routed = model(ids, return_routing=True)
    assert routed.shape == (CFG.num_moe_layers, 2, 16, CFG.num_experts_per_tok)
    replay = model(ids, forced_experts_LBTX=routed)
    np.testing.assert_allclose(replay, logits, atol=1e-6)
    forced = jnp.zeros_like(routed).at[..., 1].set(1)  # experts 0 and 1 everywhere
    logits_f, routed_f = model(ids, forced_experts_LBTX=forced, return_routing=True)
    assert (routed_f == forced).all()
    assert not np.allclose(logits_f, logits, atol=1e-4)


def test_remat_policies_and_unrolled_layers_give_same_grads():
    cfg = CFG.replace(num_hidden_layers=3)
    ids = _ids()
    graphdef, params, rest = nnx.split(init_model(cfg), nnx.Param, ...)

    def grads_for(c):
        gd, _, _ = nnx.split(init_model(c), nnx.Param, ...)
        return jax.jit(jax.grad(lambda p: jnp.mean(nnx.merge(gd, p, rest)(ids) ** 2)))(params)

    ref = grads_for(cfg)
    variants = [cfg.replace(remat_policy=p) for p in ("full", "save_dots", "save_attention_inputs")]
    for c in variants + [cfg.replace(scan_layers=False)]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ref, grads_for(c))


def test_router_bias_is_not_a_param():
    model = init_model(CFG)
    params = nnx.state(model, nnx.Param)
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)]
    assert not any("router_bias" in p for p in paths)
    assert any("router_bias" in "/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model)))


def test_param_counts_of_presets():
    air = count_params(preset("glm45_air"))
    assert abs(air["total_params"] / 1e9 - 106.85) < 0.01
    assert abs(air["active_params_per_token"] / 1e9 - 12.2) < 0.05
    small = count_params(preset("small"))["total_params"]
    assert 100e6 <= small <= 300e6


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 2, "tensor": 4}, {"fsdp": 2, "expert": 4}, {"fsdp": 8}])
def test_sharded_init_forward_and_grad_match_single_device(mesh_shape):
    ids = _ids(B=8)
    model = init_model(CFG, seed=3)
    mesh = make_mesh(mesh_shape)
    sharded = init_model(CFG, mesh, seed=3)
    gd, state = nnx.split(sharded)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 nnx.state(model), state)

    def loss(st, x):
        return jnp.mean(jax.nn.log_softmax(nnx.merge(gd, st)(x))[..., 0])
    ref_loss, ref_grad = jax.value_and_grad(loss)(nnx.state(model), ids)
    with jax.set_mesh(mesh):
        got_loss, got_grad = jax.jit(jax.value_and_grad(loss))(state, ids)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), got_grad, ref_grad)


def test_partial_routing_replay_lets_unknown_tokens_choose():
    model = init_model(CFG)
    ids = _ids()
    logits, routed = model(ids, return_routing=True)
    forced = jnp.zeros_like(routed).at[..., 1].set(1).at[:, :, :8].set(-1)  # first 8 tokens: unknown
    _, routed_f = model(ids, forced_experts_LBTX=forced, return_routing=True)
    assert (routed_f[:, :, 8:] == forced[:, :, 8:]).all()
    # Causal: the first 8 tokens see only themselves, so they route exactly as without replay.
    assert (routed_f[:, :, :8] == routed[:, :, :8]).all()


@pytest.mark.parametrize("mesh_shape", [None, {"fsdp": 2, "expert": 4}])
def test_moe_token_chunking_gives_the_same_logits_and_grads(mesh_shape):
    ids = _ids(B=8)
    cfg = CFG.replace(num_hidden_layers=2)
    base = init_model(cfg, seed=5)
    graphdef, params, rest = nnx.split(base, nnx.Param, ...)
    chunked_gd, _, _ = nnx.split(init_model(cfg.replace(moe_token_chunk=4)), nnx.Param, ...)

    def grads(gd):
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(nnx.merge(gd, p, rest)(ids) ** 2)))(params)
    if mesh_shape is None:
        ref, got = grads(graphdef), grads(chunked_gd)
    else:
        with jax.set_mesh(make_mesh(mesh_shape)):
            ref, got = grads(graphdef), grads(chunked_gd)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got[1], ref[1])


def test_smollm2_preset_counts_and_config_checks():
    cfg = preset("smollm2_135m")
    # embed 49152*576 + 30 layers * (q 576*576 + k,v 2*576*192 + o 576*576 + mlp 3*576*1536 + norms 2*576)
    # + final norm 576; tied: no lm_head.
    per_layer = 576 * 576 + 2 * 576 * 192 + 576 * 576 + 3 * 576 * 1536 + 2 * 576
    counts = count_params(cfg)
    assert counts["total_params"] == 49152 * 576 + 30 * per_layer + 576 == 134_515_008
    assert counts["active_params_per_token"] == 30 * per_layer + 576
    assert (cfg.architecture, cfg.num_moe_layers, cfg.rotary_dim) == ("LlamaForCausalLM", 0, 64)
    with pytest.raises(ValueError, match=r"model_type='llama' .* first_k_dense_replace=30 \(got 29\)"):
        preset("smollm2_135m", first_k_dense_replace=29)
    with pytest.raises(ValueError, match=r"attention_bias=False \(got True\)"):
        preset("smollm2_135m", attention_bias=True)
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        preset("smollm2_135m", model_type="gpt2")


def test_tied_embeddings_are_one_matrix_for_input_and_output():
    cfg = CFG.replace(tie_word_embeddings=True)
    model = init_model(cfg, seed=1)
    state = nnx.state(model, nnx.Param)
    assert "lm_head" not in state
    ids = _ids()
    h, _ = model.hidden_states(ids)
    E = state["embed_tokens"].get_value()
    np.testing.assert_allclose(model(ids), np.einsum("btd,vd->btv", h, E), rtol=1e-5, atol=1e-5)
    # The gradient of the embedding has both parts: rows of the input tokens, and every row via the logits.
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    grad = jax.grad(lambda p: jnp.mean(jax.nn.log_softmax(nnx.merge(gd, p, rest)(ids))[..., 3]))(params)
    g = np.asarray(grad["embed_tokens"].get_value())
    unused = np.setdiff1d(np.arange(cfg.vocab_size), np.asarray(ids))
    assert np.abs(g[unused]).max() > 0          # output side reaches tokens never in the input
    assert count_params(cfg)["total_params"] == count_params(CFG)["total_params"] - cfg.vocab_size * cfg.hidden_size


def test_tied_llama_prefill_and_decode_match_the_forward():
    """The KV-cache path (prefill 6 tokens, then 1 at a time) of an all-dense tied llama gives the forward's
    logits at every position: no MoE stack, no lm_head."""
    cfg = CFG.replace(model_type="llama", first_k_dense_replace=CFG.num_hidden_layers, attention_bias=False,
                      partial_rotary_factor=1.0, tie_word_embeddings=True)
    model = init_model(cfg, seed=2)
    ids = _ids(B=1, T=10)
    ref = np.asarray(model(ids))[0]
    h, cache, routed = model.prefill(ids[:, :6], cache_len=10)
    assert routed is None and cache["moe"] is None
    outs = [np.asarray(model.logits(h))[0]]
    valid = jnp.ones((1, 10), bool)
    for t in range(6, 10):
        logits, cache, _ = model.decode_step(ids[:, t:t + 1], cache, positions_BT=jnp.full((1, 1), t),
                                             write_index=t, kv_valid_BS=valid)
        outs.append(np.asarray(logits)[0])
    np.testing.assert_allclose(np.concatenate(outs), ref, atol=1e-4, rtol=0)


def test_profile_scopes_name_the_layers():
    """jax.named_scope on decoder layers, attention, the MoE block and the dense MLP: a profile (and the lowered
    program's locations) reads decoder_layer/attention/..., decoder_layer/moe/..., decoder_layer/mlp/...."""
    cfg = preset("tiny", compute_dtype="float32", vocab_size=64, num_hidden_layers=2, n_routed_experts=4)
    graphdef, state = nnx.split(init_model(cfg))
    ids = np.zeros((1, 8), np.int32)
    text = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, ids).as_text(debug_info=True)
    for path in ("decoder_layer/attention/", "decoder_layer/moe/", "decoder_layer/mlp/"):
        assert path in text, path
