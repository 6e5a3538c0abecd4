"""The jit'd RL update: the trainer's log-probs of the sampled tokens (optionally with the sampler's
expert routing forced: routing replay), the clipped policy loss with truncated importance weights, the
optional k3 KL to a frozen reference, one AdamW update per mini-batch (one batch, or micro-batches whose
gradients are summed exactly in-graph by SFT's `accumulate_gradients`: `jit_rl_minibatch_update`); same
sharding/donation scheme as SFT, and the same guarded optimizer step (`apply_gradients`).

The policy being optimised is the one the sampler draws from: softmax(logits / temperature). The trainer
therefore divides its logits by the rollout temperature too; otherwise the ratio against the sampler's
(tempered) log-probs would carry a systematic bias at any temperature other than 1.

rl.loss_chunk > 0 makes the log-probs and entropies from the hidden states `loss_chunk` tokens at a time
(rl/objective.py `chunked_token_logprobs`), so no [B, T, V] logits are ever live: the same numbers, a fraction of
the memory at a large vocabulary; 0 (off): one [B, T, V] pass.

What trains follows the run's TrainablePlan (klong_jax/training/trainable.py): state["params"] and
`ref_params` are the trainable subset, `frozen` the rest of the parameters ({}: every parameter trains); the
update itself is the SFT step's (`apply_gradients`)."""
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from klong_jax.rl.objective import chunked_token_logprobs, policy_loss
from klong_jax.training.step import accumulate_gradients, apply_gradients
from klong_jax.training.trainable import bind_model

MODEL_KEYS = ("input_ids", "targets", "positions", "doc_ids", "window_ids")


def _loss_chunk(rl_cfg) -> int:
    """rl.loss_chunk of an RLConfig; a mapping without the key (older configs, tests): 0, off."""
    return int(getattr(rl_cfg, "loss_chunk", 0) or 0)


def token_logprobs(graphdef, params, rest, batch, *, routing_replay: bool, temperature: float = 1.0, frozen=None,
                   plan=None, loss_chunk: int = 0):
    """log p(target) [B, T] and entropy [B, T] (fp32) of softmax(logits / temperature) under (params, frozen);
    routed experts forced when replaying. The logits are made from the final hidden states `loss_chunk` tokens at
    a time (chunked_token_logprobs; <= 0: all T at once, exactly the model's forward)."""
    model, pieces = bind_model(graphdef, params, rest, frozen, plan)
    forced = jnp.transpose(batch["routed"], (2, 0, 1, 3)) if routing_replay else None   # [L, B, T, X]
    h_BTD, _ = model.hidden_states(batch["input_ids"], positions_BT=batch["positions"], doc_ids_BT=batch["doc_ids"],
                                   window_ids_BT=batch["window_ids"], forced_experts_LBTX=forced,
                                   stack_pieces=pieces)
    return chunked_token_logprobs(model.logits, h_BTD, batch["targets"], loss_chunk, temperature)


def old_logprobs(params, rest, batch, frozen=None, *, graphdef, temperature: float = 1.0, plan=None,
                 routing_replay: bool = True, replay_gap: bool = True, loss_chunk: int = 0):
    """Trainer log-probs before the update: (with routing replay, without). replay_gap=True computes both (the
    mismatch study: how much of the sampler-trainer gap replay closes); False only the one the update uses
    (`routing_replay`), the other is None: one forward pass per batch instead of two. loss_chunk: as in
    `token_logprobs`."""
    kw = dict(temperature=temperature, frozen=frozen, plan=plan, loss_chunk=loss_chunk)
    with_replay = without = None
    if replay_gap or routing_replay:
        with_replay, _ = token_logprobs(graphdef, params, rest, batch, routing_replay=True, **kw)
    if replay_gap or not routing_replay:
        without, _ = token_logprobs(graphdef, params, rest, batch, routing_replay=False, **kw)
    return with_replay, without


def rl_grads(params, rest, ref_params, batch, total_tokens, frozen=None, *, graphdef, rl_cfg,
             temperature: float = 1.0, plan=None):
    """(grads, loss, metrics) of the clipped policy loss of one micro-batch, normalised by `total_tokens`: the
    loss tokens of the whole mini-batch whose micro-batches are summed (objective.py: summing the micro-batches'
    losses, gradients and additive metrics gives exactly those of the mini-batch as one batch). `ref_params`: the
    trainable subset of the KL reference (its frozen part is `frozen`, which never moves)."""
    mask = batch["rl_mask"]
    kw = dict(routing_replay=rl_cfg.routing_replay, temperature=temperature, frozen=frozen, plan=plan,
              loss_chunk=_loss_chunk(rl_cfg))

    def loss_fn(p):
        logp_new, entropy = token_logprobs(graphdef, p, rest, batch, **kw)
        logp_ref = None
        if rl_cfg.kl_coef:
            logp_ref, _ = token_logprobs(graphdef, ref_params, rest, batch, **kw)
        loss, metrics = policy_loss(
            logp_new, batch["sampler_logprobs"], batch["advantages"], mask, eps_low=rl_cfg.eps_low,
            eps_high=rl_cfg.eps_high, kl_coef=rl_cfg.kl_coef, logp_ref_BT=logp_ref,
            tis_cap=rl_cfg.tis_cap or None, logp_old_BT=batch["old_logprobs"], total_tokens=total_tokens)
        metrics["entropy"] = jnp.sum(entropy * mask) / total_tokens
        return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, loss, metrics


def rl_apply(state, grads, loss, *, tx, lr_schedule):
    """The optimizer step on (summed) gradients through the one update path shared with SFT
    (`apply_gradients`: clip, AdamW, non-finite guard); returns (new_state, metrics)."""
    new_state, grad_norm, finite = apply_gradients(state, grads, loss, tx)
    return new_state, {"grad_norm": grad_norm, "lr": lr_schedule(state["step"]),
                       "nonfinite": 1 - finite.astype(jnp.int32)}


def rl_update(state, rest, ref_params, batch, frozen=None, *, graphdef, tx, rl_cfg, lr_schedule,
              temperature: float = 1.0, plan=None):
    """One update of state["params"] (the trainable subset) on the clipped policy loss of `batch` alone: the
    mini-batch step (`rl_minibatch_update`) of one micro-batch, normalised by its own loss tokens."""
    total = jnp.maximum(jnp.sum(batch["rl_mask"].astype(jnp.float32)), 1.0)
    return rl_minibatch_update(state, rest, ref_params, (batch,), total, frozen, graphdef=graphdef, tx=tx,
                               rl_cfg=rl_cfg, lr_schedule=lr_schedule, temperature=temperature, plan=plan)


def jit_rl_fns(graphdef, tx, rl_cfg, lr_schedule, state_sh, rest_sh, mesh, temperature: float = 1.0, plan=None,
               frozen_sh=None):
    """(update(state, rest, ref_params, batch, frozen), old_logprobs(params, rest, batch, frozen)), jit'd;
    `temperature`: the rollout sampling temperature (> 0); plan / frozen_sh: what trains (None / {}: all)."""
    if not temperature > 0:
        raise ValueError(f"RL needs a sampling temperature > 0 (greedy rollouts have no policy gradient), "
                         f"got {temperature}")
    replicated = NamedSharding(mesh, P())
    frozen_sh = {} if frozen_sh is None else frozen_sh
    update = jax.jit(functools.partial(rl_update, graphdef=graphdef, tx=tx, rl_cfg=rl_cfg, lr_schedule=lr_schedule,
                                       temperature=temperature, plan=plan),
                     in_shardings=(state_sh, rest_sh, state_sh["params"], None, frozen_sh),
                     out_shardings=(state_sh, replicated), donate_argnums=(0,))
    old = jax.jit(functools.partial(old_logprobs, graphdef=graphdef, temperature=temperature, plan=plan,
                                    routing_replay=bool(rl_cfg.routing_replay),
                                    replay_gap=bool(getattr(rl_cfg, "replay_gap", True)),
                                    loss_chunk=_loss_chunk(rl_cfg)))
    return update, old


def rl_minibatch_update(state, rest, ref_params, batches, total_tokens, frozen=None, *, graphdef, tx, rl_cfg,
                        lr_schedule, temperature: float = 1.0, plan=None):
    """One optimizer step on a mini-batch of M micro-batches (`batches`: a tuple of M batch dicts of one shape, e.g.
    the loop's batches of rl.batch_rows rows): their gradients summed exactly in-graph by SFT's
    `accumulate_gradients` (one micro-batch live at a time), every loss normalised by `total_tokens`, the loss tokens
    of the whole mini-batch (so the sum is the mini-batch's gradient), then `rl_apply` (the guarded step shared with
    SFT). Metrics: each micro-batch's additive metrics summed, `*_max` maxed; then the step's grad norm, lr and
    non-finite flag."""
    micro = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)

    def grad_fn(p, mb):   # aux: the metrics (their "loss" is the micro-batch's loss, stopped) and the loss itself
        grads, loss, metrics = rl_grads(p, rest, ref_params, mb, total_tokens, frozen, graphdef=graphdef,
                                        rl_cfg=rl_cfg, temperature=temperature, plan=plan)
        return grads, {**metrics, "_objective": loss}

    grads, sums = accumulate_gradients(grad_fn, state["params"], micro, maxed=lambda key: key.endswith("_max"))
    loss = sums.pop("_objective")
    new_state, applied = rl_apply(state, grads, loss, tx=tx, lr_schedule=lr_schedule)
    return new_state, {**sums, **applied}


def jit_rl_minibatch_update(graphdef, tx, rl_cfg, lr_schedule, state_sh, rest_sh, mesh, temperature: float = 1.0,
                            plan=None, frozen_sh=None):
    """update(state, rest, ref_params, batches, total_tokens, frozen) -> (state, metrics), jit'd with donated state:
    `rl_minibatch_update`, the optimizer step of rl.minibatches > 0 (rl/loop.py `update_policy`). One compilation
    per number of micro-batches M (the loop's mini-batches differ by at most one batch: at most two)."""
    if not temperature > 0:
        raise ValueError(f"RL needs a sampling temperature > 0 (greedy rollouts have no policy gradient), "
                         f"got {temperature}")
    replicated = NamedSharding(mesh, P())
    frozen_sh = {} if frozen_sh is None else frozen_sh
    return jax.jit(functools.partial(rl_minibatch_update, graphdef=graphdef, tx=tx, rl_cfg=rl_cfg,
                                     lr_schedule=lr_schedule, temperature=temperature, plan=plan),
                   in_shardings=(state_sh, rest_sh, state_sh["params"], None, None, frozen_sh),
                   out_shardings=(state_sh, replicated), donate_argnums=(0,))
