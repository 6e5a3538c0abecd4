"""RL objective math on hand-computed numbers: group advantages, the clipped policy loss, TIS, k3 KL,
token-level normalisation over micro-batches, and token entropy."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klong_jax.rl.advantages import advantage_stats, group_advantages
from klong_jax.rl.objective import policy_loss, token_entropy

# One informative group and two zero-variance groups (all 0.5: "solved half-way" by every episode,
# all 0: too hard). Group 0: mean = 2.2 / 4 = 0.55, deviations [-0.35, -0.15, 0.05, 0.45],
# population variance = (0.1225 + 0.0225 + 0.0025 + 0.2025) / 4 = 0.0875, std = 0.2958040.
REWARDS_NG = np.array([[0.2, 0.4, 0.6, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])


def test_grpo_by_hand():
    adv, valid = group_advantages(REWARDS_NG, "grpo")
    # -0.35 / 0.2958040 = -1.183216, -0.15 / 0.2958040 = -0.507093, 0.05 / ... = 0.169031, 0.45 / ... = 1.521278
    np.testing.assert_allclose(adv[0], [-1.183216, -0.507093, 0.169031, 1.521278], rtol=2e-5)
    np.testing.assert_array_equal(adv[1:], 0.0)
    np.testing.assert_array_equal(valid, [True, False, False])
    assert adv.dtype == np.float32 and adv.shape == (3, 4)


def test_grpo_uses_population_std():
    # [0, 1]: mean 0.5, population std 0.5 (the sample std would be 0.7071 and give +-0.7071).
    adv, _ = group_advantages(np.array([0.0, 1.0]), "grpo", eps=0.0)
    np.testing.assert_allclose(adv, [-1.0, 1.0], rtol=1e-6)


def test_dr_grpo_by_hand():
    adv, valid = group_advantages(REWARDS_NG, "dr_grpo")
    # r - 0.55, no std scaling
    np.testing.assert_allclose(adv[0], [-0.35, -0.15, 0.05, 0.45], atol=1e-6)
    np.testing.assert_array_equal(adv[1:], 0.0)
    np.testing.assert_array_equal(valid, [True, False, False])


def test_rloo_by_hand():
    adv, valid = group_advantages(REWARDS_NG, "rloo")
    # 0.2 - (0.4 + 0.6 + 1.0) / 3 = 0.2 - 0.666667 = -0.466667;  0.4 - (0.2 + 0.6 + 1.0) / 3 = 0.4 - 0.6 = -0.2
    # 0.6 - (0.2 + 0.4 + 1.0) / 3 = 0.6 - 0.533333 = 0.066667;  1.0 - (0.2 + 0.4 + 0.6) / 3 = 1.0 - 0.4 = 0.6
    np.testing.assert_allclose(adv[0], [-0.466667, -0.2, 0.066667, 0.6], atol=1e-6)
    np.testing.assert_array_equal(adv[1:], 0.0)
    np.testing.assert_array_equal(valid, [True, False, False])


def test_rloo_rejects_single_episode_groups():
    with pytest.raises(ValueError, match="rloo needs G >= 2"):
        group_advantages(np.array([[0.3], [0.7]]), "rloo")


def test_single_group_and_single_episode():
    adv, valid = group_advantages(np.array([1.0, 0.0, 0.0, 0.0]), "dr_grpo")
    np.testing.assert_allclose(adv, [0.75, -0.25, -0.25, -0.25], atol=1e-7)  # mean 0.25
    assert valid.shape == () and bool(valid)
    # G = 1 under GRPO: no relative signal, skipped rather than an error.
    adv, valid = group_advantages(np.array([[0.9], [0.1]]), "grpo")
    np.testing.assert_array_equal(adv, 0.0)
    np.testing.assert_array_equal(valid, [False, False])


def test_equal_within_tolerance_is_skipped():
    adv, valid = group_advantages(np.array([[0.5, 0.5 + 1e-9, 0.5], [0.5, 0.5 + 1e-3, 0.5]]), "grpo")
    np.testing.assert_array_equal(valid, [False, True])
    np.testing.assert_array_equal(adv[0], 0.0)
    assert np.all(np.isfinite(adv)) and abs(adv[1, 1]) > 1.0  # a real (small) difference is normalised up


def test_bad_rewards_rejected():
    with pytest.raises(ValueError, match="method must be one of"):
        group_advantages(REWARDS_NG, "ppo")
    with pytest.raises(ValueError, match=r"non-finite reward at index \[1, 2\]"):
        group_advantages(np.array([[0.0, 1.0, 0.5], [0.0, 1.0, np.nan]]))
    with pytest.raises(ValueError, match="expected shape"):
        group_advantages(np.zeros((2, 2, 2)))


def test_advantage_stats_counts_skipped_groups():
    _, valid = group_advantages(REWARDS_NG, "grpo")
    stats = advantage_stats(REWARDS_NG, valid)
    assert (stats["groups_total"], stats["groups_skipped"], stats["groups_valid"], stats["episodes"]) == (3, 2, 1, 12)
    assert stats["skip_fraction"] == pytest.approx(2 / 3)
    # mean = (2.2 + 2.0 + 0) / 12 = 0.35; mean of squares = (1.56 + 1.0) / 12 = 0.213333;
    # variance = 0.213333 - 0.1225 = 0.090833; std = 0.301386
    assert stats["reward_mean"] == pytest.approx(0.35)
    assert stats["reward_std"] == pytest.approx(0.301386, abs=1e-6)
    assert (stats["reward_min"], stats["reward_max"]) == (0.0, 1.0)
    with pytest.raises(ValueError, match="does not match the group axes"):
        advantage_stats(REWARDS_NG, valid[:2])


# ---- policy loss --------------------------------------------------------------------------------------

def _logp_pair(ratios_BT, base=-1.0):
    """logp_sampler = base everywhere, logp_new = base + log(ratio): the ratio is exactly `ratios_BT`."""
    sampler_BT = np.full(np.shape(ratios_BT), base, np.float32)
    return (sampler_BT + np.log(np.asarray(ratios_BT, np.float32))).astype(np.float32), sampler_BT


def _example_2x3():
    # Row 0: r=1.1, A=+1 (inside the range); r=1.5, A=+2 (above 1+0.28: clipped high);
    #        r=0.5, A=-1 (below 1-0.2: clipped low).
    # Row 1: r=1.25, A=+1 (inside only because eps_high=0.28 > 0.2); r=0.75, A=+1 (low ratio with a
    #        positive advantage: the unclipped branch is the min, not clipped); a padding token holding
    #        garbage (new - sampler = 100 -> exp overflows fp32, NaN advantage) that must not leak.
    new_BT, sampler_BT = _logp_pair([[1.1, 1.5, 0.5], [1.25, 0.75, 1.0]])
    new_BT[1, 2], sampler_BT[1, 2] = 0.0, -100.0
    adv_BT = np.array([[1.0, 2.0, -1.0], [1.0, 1.0, np.nan]], np.float32)
    mask_BT = np.array([[1, 1, 1], [1, 1, 0]], np.int32)
    return new_BT, sampler_BT, adv_BT, mask_BT


def test_policy_loss_2x3_by_hand():
    new_BT, sampler_BT, adv_BT, mask_BT = _example_2x3()
    loss, m = policy_loss(new_BT, sampler_BT, adv_BT, mask_BT)
    # per-token -min(r A, clip(r) A): -1.1, -min(3.0, 2.56) = -2.56, -min(-0.5, -0.8) = 0.8,
    #                                 -1.25, -min(0.75, 0.8) = -0.75; sum -4.86 over N = 5 -> -0.972
    assert float(loss) == pytest.approx(-0.972, abs=1e-6)
    assert float(m["pg_loss"]) == pytest.approx(-0.972, abs=1e-6) and float(m["kl_loss"]) == 0.0
    assert float(m["clip_frac_high"]) == pytest.approx(0.2)   # token (0, 1)
    assert float(m["clip_frac_low"]) == pytest.approx(0.2)    # token (0, 2)
    assert float(m["clip_frac"]) == pytest.approx(0.4)
    assert float(m["ratio_mean"]) == pytest.approx(1.02, abs=1e-6)  # (1.1 + 1.5 + 0.5 + 1.25 + 0.75) / 5
    assert float(m["ratio_max"]) == pytest.approx(1.5, abs=1e-6)
    # k3 = 1/r + ln r - 1: 0.0044011, 0.0721318, 0.3068528, 0.0231436, 0.0456512; sum 0.4521805 / 5
    assert float(m["approx_kl_mean"]) == pytest.approx(0.0904361, abs=1e-6)
    assert float(m["tokens"]) == 5.0
    # no logp_old: the sampler is the old policy, TIS weights are 1, mismatch 0
    assert float(m["tis_weight_mean"]) == pytest.approx(1.0) and float(m["tis_capped_frac"]) == 0.0
    assert float(m["sampler_mismatch_mean"]) == 0.0


def test_policy_loss_gradient_2x3():
    new_BT, sampler_BT, adv_BT, mask_BT = _example_2x3()
    grad_BT = jax.grad(lambda x: policy_loss(x, sampler_BT, adv_BT, mask_BT)[0])(jnp.asarray(new_BT))
    # inside: -A r / N = -1.1/5, -1.25/5, -0.75/5; clipped tokens and padding: exactly 0
    np.testing.assert_allclose(grad_BT, [[-0.22, 0.0, 0.0], [-0.25, -0.15, 0.0]], atol=1e-6)
    assert grad_BT[0, 1] == 0.0 and grad_BT[0, 2] == 0.0 and grad_BT[1, 2] == 0.0


def test_symmetric_eps_clips_what_asymmetric_keeps():
    new_BT, sampler_BT, adv_BT, mask_BT = _example_2x3()
    loss_fn = lambda x: policy_loss(x, sampler_BT, adv_BT, mask_BT, eps_low=0.2, eps_high=0.2)  # noqa: E731
    (loss, m), grad_BT = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(new_BT))
    # r = 1.25 > 1.2 now clips: -1.2 instead of -1.25 (gradient 0), and r = 1.5 clips at 1.2 * 2 = 2.4
    # instead of 2.56: (-4.86 + 0.05 + 0.16) / 5 = -4.65 / 5 = -0.93
    assert float(loss) == pytest.approx(-0.93, abs=1e-6)
    assert float(m["clip_frac_high"]) == pytest.approx(0.4)
    assert grad_BT[1, 0] == 0.0


def test_asymmetric_clip_by_hand():
    # The same distance 0.22 from 1 on both sides: 1.22 (A=+1) stays inside 1+0.28, 0.78 (A=-1) falls
    # below 1-0.2 and clips. r=1.5 with A=-1 and r=0.5 with A=+1 are the pessimistic branch: never clipped.
    new_BT, sampler_BT = _logp_pair([[1.22, 0.78, 1.5, 0.5]])
    adv_BT = np.array([[1.0, -1.0, -1.0, 1.0]], np.float32)
    mask_BT = np.ones((1, 4), np.int32)
    loss_fn = lambda x: policy_loss(x, sampler_BT, adv_BT, mask_BT)  # noqa: E731
    (loss, m), grad_BT = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(new_BT))
    # per token: -1.22, -min(-0.78, -0.8) = 0.8, -min(-1.5, -1.28) = 1.5, -min(0.5, 0.8) = -0.5; sum 0.58 / 4
    assert float(loss) == pytest.approx(0.145, abs=1e-6)
    # gradient -A r / N where unclipped: -1.22/4, 0, 1.5/4, -0.5/4
    np.testing.assert_allclose(grad_BT, [[-0.305, 0.0, 0.375, -0.125]], atol=1e-6)
    assert float(m["clip_frac_low"]) == pytest.approx(0.25) and float(m["clip_frac_high"]) == 0.0


def test_k3_kl_value_and_gradient():
    # ref - new = ln 2 and ln 0.5; advantages 0 so only the KL term is left.
    new_BT = np.array([[-1.0, -1.0]], np.float32)
    ref_BT = new_BT + np.log(np.array([[2.0, 0.5]], np.float32))
    zeros_BT, mask_BT = np.zeros((1, 2), np.float32), np.ones((1, 2), np.int32)
    loss_fn = lambda x: policy_loss(x, new_BT, zeros_BT, mask_BT, kl_coef=0.1, logp_ref_BT=ref_BT)  # noqa: E731
    (loss, m), grad_BT = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(new_BT))
    # k3 = e^d - d - 1: 2 - 0.6931472 - 1 = 0.3068528 and 0.5 + 0.6931472 - 1 = 0.1931472; mean 0.25
    assert float(m["kl_ref_mean"]) == pytest.approx(0.25, abs=1e-6)
    assert float(loss) == pytest.approx(0.025, abs=1e-7) and float(m["kl_loss"]) == pytest.approx(0.025, abs=1e-7)
    # d k3 / d new = 1 - e^d: -1 and 0.5, times kl_coef / N = 0.05
    np.testing.assert_allclose(grad_BT, [[-0.05, 0.025]], atol=1e-6)
    with pytest.raises(ValueError, match="needs logp_ref_BT"):
        policy_loss(new_BT, new_BT, zeros_BT, mask_BT, kl_coef=0.1)


def _tis_example():
    # old - sampler = ln 3 (weight 3, capped to 2) and ln 0.5 (weight 0.5); new = old + ln 1.1, A = 1.
    old_BT = np.array([[-2.0, -0.5]], np.float32)
    sampler_BT = old_BT - np.log(np.array([[3.0, 0.5]], np.float32))
    new_BT = old_BT + np.float32(math.log(1.1))
    return new_BT, sampler_BT, old_BT, np.ones((1, 2), np.float32), np.ones((1, 2), np.int32)


def test_tis_weights_capped_and_constant():
    new_BT, sampler_BT, old_BT, adv_BT, mask_BT = _tis_example()

    def loss_fn(new, sampler, old):
        return policy_loss(new, sampler, adv_BT, mask_BT, logp_old_BT=old, tis_cap=2.0)

    (loss, m), grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(
        jnp.asarray(new_BT), jnp.asarray(sampler_BT), jnp.asarray(old_BT))
    # ratio against old = 1.1 (inside the range): loss = -(2 * 1.1 + 0.5 * 1.1) / 2 = -1.375
    assert float(loss) == pytest.approx(-1.375, abs=1e-6)
    assert float(m["ratio_mean"]) == pytest.approx(1.1, abs=1e-6)   # not 3.3 / 0.55: old, not sampler
    # gradient -w A r / N = -2 * 1.1 / 2, -0.5 * 1.1 / 2; none reaches the sampler or old log-probs
    np.testing.assert_allclose(grads[0], [[-1.1, -0.275]], atol=1e-6)
    np.testing.assert_array_equal(grads[1], 0.0)
    np.testing.assert_array_equal(grads[2], 0.0)
    assert float(m["tis_weight_mean"]) == pytest.approx(1.25, abs=1e-6)  # (2 + 0.5) / 2
    assert float(m["tis_weight_max"]) == pytest.approx(2.0)
    assert float(m["tis_capped_frac"]) == pytest.approx(0.5)
    # |mismatch| = (ln 3 + ln 2) / 2 = (1.0986123 + 0.6931472) / 2
    assert float(m["sampler_mismatch_mean"]) == pytest.approx(0.8958797, abs=1e-6)


def test_tis_disabled_still_reports_mismatch():
    new_BT, sampler_BT, old_BT, adv_BT, mask_BT = _tis_example()
    loss, m = policy_loss(new_BT, sampler_BT, adv_BT, mask_BT, logp_old_BT=old_BT, tis_cap=None)
    assert float(loss) == pytest.approx(-1.1, abs=1e-6)   # weights 1: -(1.1 + 1.1) / 2
    assert float(m["tis_weight_mean"]) == pytest.approx(1.0) and float(m["tis_capped_frac"]) == 0.0
    assert float(m["sampler_mismatch_mean"]) == pytest.approx(0.8958797, abs=1e-6)


def _random_batch(B=4, T=5, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    sampler_BT = -np.abs(f(B, T)) - 0.5
    return dict(logp_new_BT=sampler_BT + 0.3 * f(B, T), logp_sampler_BT=sampler_BT,
                advantages_BT=np.repeat(f(B, 1), T, axis=1), loss_mask_BT=(rng.random((B, T)) < 0.7).astype(np.int32),
                logp_old_BT=sampler_BT + 0.2 * f(B, T), logp_ref_BT=sampler_BT + 0.2 * f(B, T))


MAX_KEYS = ("ratio_max", "tis_weight_max")


def test_micro_batches_sum_to_the_full_batch():
    batch = _random_batch()
    kwargs = dict(kl_coef=0.05, tis_cap=1.2)
    total = float(batch["loss_mask_BT"].sum())
    assert 0 < total < batch["loss_mask_BT"].size

    def loss_and_grad(part, total_tokens=None):
        def fn(new):
            return policy_loss(new, **{k: v for k, v in part.items() if k != "logp_new_BT"}, **kwargs,
                               total_tokens=total_tokens)
        return jax.value_and_grad(fn, has_aux=True)(jnp.asarray(part["logp_new_BT"]))

    (full_loss, full_m), full_grad = loss_and_grad(batch)
    halves = [{k: v[rows] for k, v in batch.items()} for rows in (slice(0, 2), slice(2, 4))]
    results = [loss_and_grad(h, total_tokens=total) for h in halves]
    assert sum(float(r[0][0]) for r in results) == pytest.approx(float(full_loss), abs=1e-6)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), full_grad, atol=1e-7)
    for key, value in full_m.items():
        parts = [float(r[0][1][key]) for r in results]
        combined = max(parts) if key in MAX_KEYS else sum(parts)
        assert combined == pytest.approx(float(value), abs=1e-6), key
    # the metrics actually exercised TIS capping, clipping and the KL term in this batch
    assert float(full_m["tis_capped_frac"]) > 0 and float(full_m["kl_ref_mean"]) > 0
    assert float(full_m["clip_frac_low"]) > 0 and float(full_m["clip_frac_high"]) > 0


def test_policy_loss_jits_and_matches_eager():
    batch = _random_batch(seed=1)
    fn = functools.partial(policy_loss, eps_low=0.1, eps_high=0.15, kl_coef=0.02, tis_cap=1.5)
    eager_loss, eager_m = fn(**batch)
    jit_loss, jit_m = jax.jit(fn)(**batch)
    assert float(jit_loss) == pytest.approx(float(eager_loss), abs=1e-6)
    assert float(jit_m["clip_frac"]) == pytest.approx(float(eager_m["clip_frac"]))
    assert jit_loss.dtype == jnp.float32


def test_policy_loss_shape_and_range_errors():
    batch = _random_batch()
    with pytest.raises(ValueError, match="advantages_BT has shape"):
        policy_loss(**(batch | {"advantages_BT": batch["advantages_BT"][:, :1]}))
    with pytest.raises(ValueError, match="eps_low"):
        policy_loss(**batch, eps_low=1.0)
    with pytest.raises(ValueError, match="tis_cap"):
        policy_loss(**batch, tis_cap=0.0)


def test_bf16_inputs_computed_in_fp32():
    new_BT, sampler_BT, adv_BT, mask_BT = _example_2x3()
    loss, _ = policy_loss(jnp.asarray(new_BT, jnp.bfloat16), jnp.asarray(sampler_BT, jnp.bfloat16), adv_BT, mask_BT)
    assert loss.dtype == jnp.float32 and bool(jnp.isfinite(loss))


# ---- entropy ------------------------------------------------------------------------------------------

def test_token_entropy_by_hand():
    inf = float("inf")
    logits_BTV = jnp.array([[[0.0, 0.0, 0.0, 0.0],                       # uniform over 4: ln 4 = 1.3862944
                             [math.log(0.5), math.log(0.25), math.log(0.25), -inf]],  # 0.5 ln 2 + 0.5 ln 4
                            [[1000.0, 1000.0, -inf, -inf],               # huge logits, two live: ln 2
                             [3.0, -inf, -inf, -inf]]])                  # one-hot: 0
    ent_BT = token_entropy(logits_BTV)
    # 0.5 ln 2 + 2 * 0.25 ln 4 = 0.3465736 + 0.6931472 = 1.0397208
    np.testing.assert_allclose(ent_BT, [[1.3862944, 1.0397208], [0.6931472, 0.0]], atol=1e-6)
    assert ent_BT.dtype == jnp.float32
    grad_BTV = jax.grad(lambda x: jnp.sum(token_entropy(x)))(logits_BTV)
    assert bool(jnp.all(jnp.isfinite(grad_BTV)))
    np.testing.assert_allclose(grad_BTV[0, 0], 0.0, atol=1e-7)   # uniform is the maximum: zero gradient
