"""Sampler: KV-cache generation equals the full forward pass; sampling filters; stops; compilations."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klong_jax.data.synthetic import synthetic_corpus, texts_of
from klong_jax.data.tokenizer import SentencePieceTokenizer
from klong_jax.data.train_tokenizer import train_sentencepiece
from klong_jax.models import init_model, preset
from klong_jax.sampling import TRACE_COUNTS, Sampler, SamplingParams, length_bucket, sample_tokens

CFG = preset("tiny", compute_dtype="float32", vocab_size=512, num_hidden_layers=2, max_position_embeddings=512)
PROMPT_LENS = (3, 17, 9, 30)          # ragged, one prompt bucket (32)


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, ids_BT):
    return nnx.merge(graphdef, state)(ids_BT, return_routing=True)


def forward_check(model, prompts, completions, *, routing=True, atol=1e-4):
    """Every generated token is the argmax (for greedy) / has the log-prob of one full forward pass
    over prompt + generated tokens, and its routing is the forward's routing."""
    seqs = [list(p) + c.tokens for p, c in zip(prompts, completions)]
    T = max(64, max(map(len, seqs)))  # one shape for every call: compiled once
    ids = np.zeros((len(seqs), T), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s           # right padding: causal, so real positions are unaffected
    graphdef, state = nnx.split(model)
    logits, routed = _jit_forward(graphdef, state, jnp.asarray(ids))
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    routed = np.asarray(routed)
    argmaxes = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        L, n = len(p), len(c.tokens)
        rows = logp[i, L - 1:L - 1 + n]
        np.testing.assert_allclose(c.logprobs, rows[np.arange(n), c.tokens], atol=atol, rtol=0)
        argmaxes.append(rows.argmax(-1).tolist())
        if routing:
            np.testing.assert_array_equal(c.routed_experts, routed[:, i, L:L + n])
            np.testing.assert_array_equal(c.prompt_routed_experts, routed[:, i, :L])
    return argmaxes


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = train_sentencepiece(list(texts_of(synthetic_corpus(10, seed=0))),
                               os.path.join(tmp_path_factory.mktemp("tok"), "sp.model"), vocab_size=512)
    return SentencePieceTokenizer(path)


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=3)


@pytest.fixture(scope="module")
def sampler(model, tokenizer):
    # decode_chunk=4: the host loop (stop strings, early exit) runs several chunks per request.
    # min_batch=4: every call below shares one batch bucket (and one compilation).
    return Sampler(model, tokenizer, default_stop_token_ids=(), decode_chunk=4, min_batch=4)


def _prompts(lens=PROMPT_LENS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, CFG.vocab_size, n).tolist() for n in lens]


GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, return_routing=True, return_prompt_routing=True)


def test_greedy_ragged_batch_equals_full_forward(model, sampler):
    prompts = _prompts()
    out = sampler.generate(prompts, GREEDY)
    argmaxes = forward_check(model, prompts, out)
    for c, am in zip(out, argmaxes):
        assert c.tokens == am
        assert c.finish_reason == "length" and len(c.tokens) == 12
        assert c.routed_experts.shape == (CFG.num_moe_layers, 12, CFG.num_experts_per_tok)
        np.testing.assert_array_equal(c.sampling_logprobs, 0.0)
    # each row alone generates the same tokens as inside the ragged batch
    alone = sampler.generate(prompts[3:], GREEDY)[0]
    assert alone.tokens == out[3].tokens


def test_per_row_max_new_tokens(sampler):
    prompts = _prompts()
    params = [GREEDY.replace(max_new_tokens=n, return_prompt_routing=False) for n in (1, 5, 12, 7)]
    params[3] = params[3].replace(return_routing=False)
    out = sampler.generate(prompts, params)
    assert [len(c.tokens) for c in out] == [1, 5, 12, 7]
    assert all(c.finish_reason == "length" and c.prompt_routed_experts is None for c in out)
    assert [c.routed_experts.shape[1] for c in out[:3]] == [1, 5, 12] and out[3].routed_experts is None


def test_top_k_1_equals_greedy_and_logprobs_are_unmodified(sampler):
    prompts = _prompts()
    greedy = sampler.generate(prompts, GREEDY)
    top1 = sampler.generate(prompts, [GREEDY.replace(temperature=1.3, top_k=1, seed=s) for s in range(4)])
    for g, t in zip(greedy, top1):
        assert t.tokens == g.tokens
        np.testing.assert_allclose(t.logprobs, g.logprobs, atol=1e-6)
        np.testing.assert_allclose(t.sampling_logprobs, 0.0, atol=1e-6)   # a point mass


def test_sampled_tokens_logprobs_and_seeds(model, sampler):
    prompts = _prompts()
    params = [GREEDY.replace(temperature=0.9, top_p=0.95, top_k=50, seed=s) for s in (7, 8, 9, 10)]
    a = sampler.generate(prompts, params)
    forward_check(model, prompts, a)           # log-probs under the unmodified distribution
    assert all((c.sampling_logprobs >= c.logprobs - 1e-5).all() for c in a)   # filtering only adds mass
    # A row's sample depends on its seed and prompt, not on its place in the batch.
    order = [2, 0, 3, 1]
    b = sampler.generate([prompts[i] for i in order], [params[i] for i in order])
    assert [c.tokens for c in b] == [a[i].tokens for i in order]
    c = sampler.generate(prompts, [p.replace(seed=p.seed + 100) for p in params])
    assert [x.tokens for x in c] != [x.tokens for x in a]


def _frequencies(logits, n, **kw):
    B = n
    logits_BV = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (B, len(logits)))
    keys = jax.random.split(jax.random.key(0), B)
    args = {k: jnp.full((B,), v, jnp.float32 if k != "top_k" else jnp.int32) for k, v in kw.items()}
    tokens, lp, slp = jax.jit(sample_tokens)(logits_BV, keys, args["temperature"], args["top_k"], args["top_p"])
    freq = np.bincount(np.asarray(tokens), minlength=len(logits)) / B
    return freq, np.asarray(tokens), np.asarray(lp), np.asarray(slp)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_statistics(temperature):
    logits = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05]))
    freq, tokens, lp, slp = _frequencies(logits, 20000, temperature=temperature, top_k=0, top_p=1.0)
    expected = np.asarray(jax.nn.softmax(logits / temperature))
    np.testing.assert_allclose(freq, expected, atol=0.02)
    np.testing.assert_allclose(lp, logits[tokens], atol=1e-5)
    np.testing.assert_allclose(slp, np.log(expected)[tokens], atol=1e-5)


def test_top_k_and_top_p_keep_only_their_sets():
    probs = np.array([0.45, 0.25, 0.15, 0.1, 0.05])
    logits = np.log(probs)
    freq, tokens, _, slp = _frequencies(logits, 20000, temperature=1.0, top_k=2, top_p=1.0)
    np.testing.assert_allclose(freq, [0.45 / 0.7, 0.25 / 0.7, 0, 0, 0], atol=0.02)
    np.testing.assert_allclose(slp, np.log(probs / 0.7)[tokens], atol=1e-5)
    # nucleus 0.8: tokens 0..2 (mass above token 2 is 0.7 < 0.8; above token 3 it is 0.85)
    freq, tokens, _, slp = _frequencies(logits, 20000, temperature=1.0, top_k=0, top_p=0.8)
    np.testing.assert_allclose(freq, [0.45 / 0.85, 0.25 / 0.85, 0.15 / 0.85, 0, 0], atol=0.02)
    np.testing.assert_allclose(slp, np.log(probs / 0.85)[tokens], atol=1e-5)
    # both: top-k first, then the nucleus of what is left (0.45/0.85 = 0.53 >= 0.5: token 0 alone)
    freq, *_ = _frequencies(logits, 2000, temperature=1.0, top_k=3, top_p=0.5)
    np.testing.assert_allclose(freq, [1, 0, 0, 0, 0])


def test_stop_tokens(sampler):
    prompts = _prompts()
    free = sampler.generate(prompts, GREEDY)
    stop_at = [3, 0, 6, 11]
    stops = [c.tokens[k] for c, k in zip(free, stop_at)]
    out = sampler.generate(prompts, [GREEDY.replace(stop_token_ids=(s,)) for s in stops])
    for f, c, s in zip(free, out, stops):
        n = f.tokens.index(s) + 1
        assert c.tokens == f.tokens[:n] and c.finish_reason == "stop" and c.stop == s
        np.testing.assert_allclose(c.logprobs, f.logprobs[:n], atol=1e-6)
        np.testing.assert_array_equal(c.routed_experts, f.routed_experts[:, :n])
    # the sampler's default stop tokens apply unless a request opts out
    sampler.default_stop_token_ids = (stops[3],)
    try:
        assert sampler.generate(prompts[3:], GREEDY)[0].tokens == out[3].tokens
        assert sampler.generate(prompts[3:], GREEDY.replace(use_default_stop_tokens=False))[0].tokens == free[3].tokens
    finally:
        sampler.default_stop_token_ids = ()


def test_stop_strings(sampler, tokenizer):
    prompts = _prompts()
    free = sampler.generate(prompts, GREEDY)
    pieces = [tokenizer.decode(free[0].tokens[k:k + 1]) for k in range(len(free[0].tokens))]
    k = next(k for k in range(4, 12) if pieces[k].strip())
    stop = pieces[k].strip()[:2]
    params = [GREEDY.replace(stop_strings=(stop, "\x00never")), GREEDY, GREEDY, GREEDY]
    out = sampler.generate(prompts, params)
    n = next(n for n in range(1, 13) if stop in tokenizer.decode(free[0].tokens[:n]))
    full_text = tokenizer.decode(free[0].tokens[:n])
    c = out[0]
    assert c.tokens == free[0].tokens[:n] and c.finish_reason == "stop" and c.stop == stop
    assert c.text == full_text[:full_text.find(stop)]
    assert c.routed_experts.shape[1] == n
    assert [x.tokens for x in out[1:]] == [x.tokens for x in free[1:]]      # other rows unaffected
    assert out[1].text == tokenizer.decode(free[1].tokens)


def test_no_recompilation_within_a_bucket(sampler):
    params = GREEDY.replace(max_new_tokens=10)
    sampler.generate(_prompts((5, 30, 9)), params)
    before = dict(TRACE_COUNTS)
    # other prompt lengths, batch size, max_new_tokens, temperature, top-k/p and stops: same buckets
    sampler.generate(_prompts((31, 2, 17, 8), seed=1),
                     [params.replace(max_new_tokens=16, temperature=0.7, top_p=0.9, seed=1, stop_token_ids=(5,)),
                      params.replace(max_new_tokens=3), params, params.replace(top_k=5, temperature=1.0)])
    assert dict(TRACE_COUNTS) == before
    # a longer prompt is another bucket: one more prefill and decode compilation (the counter counts)
    assert length_bucket(40) != length_bucket(31)
    sampler.generate(_prompts((40,)), params)
    assert TRACE_COUNTS["prefill"] == before["prefill"] + 1
    assert TRACE_COUNTS["decode_chunk"] == before["decode_chunk"] + 1


def test_bad_requests_name_the_problem(sampler):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.generate([[3], []], GREEDY)
    with pytest.raises(ValueError, match="outside"):
        sampler.generate([[CFG.vocab_size]], GREEDY)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sampler.generate([[3] * 500], GREEDY.replace(max_new_tokens=100))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_model_decode_step_extends_an_empty_cache_like_the_forward(model):
    """Glm4MoeForCausalLM.init_cache + decode_step (a 5-token chunk, then single tokens) give the
    full forward's logits and routing: the cache path without prefill, on one row with left padding."""
    graphdef, state = nnx.split(model)
    ids = np.asarray(_prompts((9,))[0], np.int32)
    pad, S = 2, 16                                   # row starts at slot 2; slots 0-1 are padding
    kv_valid = jnp.asarray(np.arange(S) >= pad)[None]

    @jax.jit
    def step(state, cache, tok_BT, write_index, positions_start):
        T = tok_BT.shape[1]
        positions = (positions_start + jnp.arange(T))[None]
        return nnx.merge(graphdef, state).decode_step(tok_BT, cache, positions_BT=positions,
                                                      write_index=write_index, kv_valid_BS=kv_valid)

    cache = model.init_cache(1, S)
    assert cache["moe"]["k"].shape == (CFG.num_moe_layers, 1, S, CFG.num_key_value_heads, CFG.head_dim)
    logits, cache, routed = step(state, cache, jnp.asarray(ids[None, :5]), pad, 0)
    outs, routes = [logits[0]], [routed[:, 0]]
    for t in range(5, 9):
        logits, cache, routed = step(state, cache, jnp.asarray(ids[None, t:t + 1]), pad + t, t)
        outs.append(logits[0])
        routes.append(routed[:, 0])
    ref_logits, ref_routed = _jit_forward(graphdef, state, jnp.asarray(ids[None]))
    np.testing.assert_allclose(np.concatenate(outs), ref_logits[0], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.concatenate(routes, axis=1), ref_routed[:, 0])
