"""The jit'd RL update: the trainer's log-probs of the sampled tokens (optionally with the sampler's
expert routing forced: routing replay), the clipped policy loss with truncated importance weights, the
optional k3 KL to a frozen reference, one AdamW update; same sharding/donation scheme as SFT.

The policy being optimised is the one the sampler draws from: softmax(logits / temperature). The trainer
therefore divides its logits by the rollout temperature too; otherwise the ratio against the sampler's
(tempered) log-probs would carry a systematic bias at any temperature other than 1."""
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from klong_jax.rl.objective import policy_loss, token_entropy
from klong_jax.training.loss import token_losses

MODEL_KEYS = ("input_ids", "targets", "positions", "doc_ids", "window_ids")


def token_logprobs(graphdef, params, rest, batch, *, routing_replay: bool, temperature: float = 1.0):
    """log p(target) [B, T] and entropy [B, T] of softmax(logits / temperature) under params; routed
    experts forced when replaying."""
    model = nnx.merge(graphdef, params, rest)
    forced = jnp.transpose(batch["routed"], (2, 0, 1, 3)) if routing_replay else None   # [L, B, T, k]
    logits_BTV = model(batch["input_ids"], positions_BT=batch["positions"], doc_ids_BT=batch["doc_ids"],
                       window_ids_BT=batch["window_ids"], forced_experts_LBTK=forced)
    if temperature != 1.0:
        logits_BTV = logits_BTV.astype(jnp.float32) / temperature
    loss_BT, _ = token_losses(logits_BTV, batch["targets"])
    return -loss_BT, token_entropy(logits_BTV)


def old_logprobs(params, rest, batch, *, graphdef, temperature: float = 1.0):
    """Trainer log-probs before the update, with and without routing replay (the mismatch study)."""
    with_replay, _ = token_logprobs(graphdef, params, rest, batch, routing_replay=True, temperature=temperature)
    without, _ = token_logprobs(graphdef, params, rest, batch, routing_replay=False, temperature=temperature)
    return with_replay, without


def rl_update(state, rest, ref_params, batch, *, graphdef, tx, rl_cfg, lr_schedule, temperature: float = 1.0):
    mask = batch["rl_mask"]
    total = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)

    def loss_fn(p):
        logp_new, entropy = token_logprobs(graphdef, p, rest, batch, routing_replay=rl_cfg.routing_replay,
                                           temperature=temperature)
        logp_ref = None
        if rl_cfg.kl_coef:
            logp_ref, _ = token_logprobs(graphdef, ref_params, rest, batch, routing_replay=rl_cfg.routing_replay,
                                         temperature=temperature)
        loss, metrics = policy_loss(
            logp_new, batch["sampler_logprobs"], batch["advantages"], mask, eps_low=rl_cfg.eps_low,
            eps_high=rl_cfg.eps_high, kl_coef=rl_cfg.kl_coef, logp_ref_BT=logp_ref,
            tis_cap=rl_cfg.tis_cap or None, logp_old_BT=batch["old_logprobs"], total_tokens=total)
        metrics["entropy"] = jnp.sum(entropy * mask) / total
        return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = {"params": keep(new_params, state["params"]), "opt_state": keep(new_opt, state["opt_state"]),
                 "step": state["step"] + finite.astype(jnp.int32)}
    metrics.update(grad_norm=grad_norm, lr=lr_schedule(state["step"]), nonfinite=1 - finite.astype(jnp.int32))
    return new_state, metrics


def jit_rl_fns(graphdef, tx, rl_cfg, lr_schedule, state_sh, rest_sh, mesh, temperature: float = 1.0):
    """(update, old_logprobs), jit'd; `temperature`: the rollout sampling temperature (> 0)."""
    if not temperature > 0:
        raise ValueError(f"RL needs a sampling temperature > 0 (greedy rollouts have no policy gradient), "
                         f"got {temperature}")
    replicated = NamedSharding(mesh, P())
    update = jax.jit(functools.partial(rl_update, graphdef=graphdef, tx=tx, rl_cfg=rl_cfg, lr_schedule=lr_schedule,
                                       temperature=temperature),
                     in_shardings=(state_sh, rest_sh, state_sh["params"], None), out_shardings=(state_sh, replicated),
                     donate_argnums=(0,))
    old = jax.jit(functools.partial(old_logprobs, graphdef=graphdef, temperature=temperature))
    return update, old
