"""The jit'd, sharded SFT train step with gradient accumulation and a non-finite guard.

State is a dict {"params": pure dict of the TRAINABLE nnx.Params, "opt_state": optax state over them,
"step": int32}; the model's non-trainable variables (router bias) travel separately as `rest`, and the
parameters a `TrainablePlan` freezes as `frozen` ({} when every parameter trains); neither is updated here.
`apply_gradients` is the one update path of the SFT and the RL step.
"""
import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from klong_jax.sharding import constrain, logical_to_spec
from klong_jax.training.loss import chunked_masked_sums
from klong_jax.training.trainable import bind_model

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "positions", "doc_ids", "window_ids")


def forward_sums(graphdef, params, rest, batch, z_loss_weight=0.0, loss_chunk=0, *, frozen=None, plan=None):
    """Loss sums of `batch` under the model of (params, frozen, rest) (`plan`: klong_jax.training.trainable;
    None: params are all of them)."""
    model, pieces = bind_model(graphdef, params, rest, frozen, plan)
    h_BTD, _ = model.hidden_states(batch["input_ids"], positions_BT=batch["positions"],
                                   doc_ids_BT=batch["doc_ids"], window_ids_BT=batch["window_ids"],
                                   stack_pieces=pieces)
    return chunked_masked_sums(model.logits, h_BTD, batch["targets"], batch["loss_mask"], loss_chunk,
                               z_loss_weight)


def apply_gradients(state, grads, loss, tx):
    """The one update path (SFT and RL): g -> tx (clip by ||g||, AdamW) -> params; a non-finite loss or
    gradient norm leaves params, optimizer state and step untouched. Returns (new_state, grad_norm, finite)."""
    params = state["params"]
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = {"params": keep(new_params, params), "opt_state": keep(new_opt, state["opt_state"]),
                 "step": state["step"] + finite.astype(jnp.int32)}
    return new_state, grad_norm, finite


def accumulate_gradients(grad_fn, params, micro, *, maxed=lambda key: False):
    """The exact sum over M micro-batches of `grad_fn(params, mb) -> (grads, aux)`; micro: a pytree whose every
    leaf has the micro-batch index as its leading axis [M, ...]. One micro-batch is live at a time (lax.scan).
    Gradients are summed in fp32 and returned in each param's dtype; aux (a dict of arrays) is summed key by key,
    except the keys for which `maxed(key)` holds, which are maxed. The sum is the whole batch's gradient when each
    micro-batch's loss is normalised by the whole batch's count (loss tokens): the caller's loss does that.
    The one accumulation of SFT (`train_step`) and RL (rl/step.py `rl_minibatch_update`)."""
    first = jax.tree.map(lambda x: x[0], micro)
    aux_shape = jax.eval_shape(lambda p, mb: grad_fn(p, mb)[1], params, first)
    aux0 = {k: jnp.full(a.shape, -jnp.inf if maxed(k) else 0, a.dtype) for k, a in aux_shape.items()}

    def body(carry, mb):
        grads_acc, aux_acc = carry
        grads, aux = grad_fn(params, mb)
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
        aux_acc = {k: (jnp.maximum if maxed(k) else jnp.add)(aux_acc[k], aux[k]) for k in aux_acc}
        return (grads_acc, aux_acc), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (grads, aux), _ = jax.lax.scan(body, (zeros, aux0), micro)
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params), aux


def train_step(state, rest, batch, frozen=None, *, graphdef, tx, micro_batches: int, z_loss_weight: float,
               lr_schedule, loss_chunk: int = 0, plan=None):
    """One optimizer update over the global batch, split into `micro_batches` sequential micro-batches.

    Loss = sum of token losses / loss tokens of the whole global batch, so accumulation is exact.
    A non-finite loss or gradient leaves the state untouched (metrics report it). Gradients are taken
    w.r.t. state["params"] only: with a plan, the frozen params are constants (no gradient, no backward
    pass below the lowest trainable layer).
    """
    params = state["params"]
    total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    micro = jax.tree.map(lambda x: x.reshape((micro_batches, x.shape[0] // micro_batches) + x.shape[1:]), batch)

    def loss_fn(p, mb):
        sums = forward_sums(graphdef, p, rest, mb, z_loss_weight, loss_chunk, frozen=frozen, plan=plan)
        return sums["loss_sum"] / total_tokens, sums

    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    def grad_fn(p, mb):
        mb = {k: constrain(v, ("batch", "seq")) for k, v in mb.items()}
        (_, sums), grads = value_and_grad(p, mb)
        return grads, {k: sums[k].astype(jnp.float32) for k in ("loss_sum", "correct_sum", "tokens")}

    grads, sums = accumulate_gradients(grad_fn, params, micro)

    loss = sums["loss_sum"] / total_tokens
    new_state, grad_norm, finite = apply_gradients(state, grads, loss, tx)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(state["step"]),
               "accuracy": sums["correct_sum"] / total_tokens, "loss_tokens": sums["tokens"],
               "nonfinite": 1 - finite.astype(jnp.int32)}
    return new_state, metrics


def eval_step(params, rest, batch, *, graphdef, frozen=None, plan=None):
    return forward_sums(graphdef, params, rest, batch, frozen=frozen, plan=plan)


def batch_shardings(mesh, batch_shape):
    spec = logical_to_spec(("batch", "seq"), batch_shape, mesh)
    return {k: NamedSharding(mesh, spec) for k in BATCH_KEYS}


def _key_names(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def state_shardings(tx, param_shardings, abstract_params, mesh):
    """Optimizer-state shardings: a leaf whose key path ends with a parameter's path (and has its shape),
    e.g. Adam's mu/nu, takes that parameter's sharding; everything else (step counts) is replicated."""
    replicated = NamedSharding(mesh, P())
    by_path = {}
    for (path, a), (_, s) in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                 jax.tree_util.tree_flatten_with_path(param_shardings)[0]):
        by_path[_key_names(path)] = (a.shape, s)
    depth = max(len(p) for p in by_path)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)

    def choose(path, leaf):
        names = _key_names(path)
        for n in range(min(depth, len(names)), 0, -1):
            hit = by_path.get(names[-n:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return replicated

    opt_sh = jax.tree_util.tree_map_with_path(choose, abstract_opt)
    return {"params": param_shardings, "opt_state": opt_sh, "step": replicated}


def jit_train_step(graphdef, tx, lr_schedule, state_sh, rest_sh, batch_sh, *, micro_batches, z_loss_weight,
                   loss_chunk=0, plan=None, frozen_sh=None):
    """step(state, rest, batch, frozen) -> (state, metrics), jit'd with donated state. state_sh: over the
    trainable params (TrainLayout.state_sh); frozen / frozen_sh: the plan's frozen params ({} without a plan
    or when every parameter trains: the step is then the historical one)."""
    fn = functools.partial(train_step, graphdef=graphdef, tx=tx, micro_batches=micro_batches,
                           z_loss_weight=z_loss_weight, lr_schedule=lr_schedule, loss_chunk=loss_chunk, plan=plan)
    replicated = NamedSharding(next(iter(jax.tree.leaves(batch_sh))).mesh, P())
    frozen_sh = {} if frozen_sh is None else frozen_sh
    return jax.jit(fn, in_shardings=(state_sh, rest_sh, batch_sh, frozen_sh), out_shardings=(state_sh, replicated),
                   donate_argnums=(0,))
