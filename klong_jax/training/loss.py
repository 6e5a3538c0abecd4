"""Token-level cross-entropy over loss-mask tokens.

The trainer sums per-token losses and divides by the number of loss tokens in the WHOLE global batch
(all micro-batches, all devices), so every trained token weighs the same however the batch is split or
packed: micro-batching and accumulation give exactly the big-batch gradient.

The chunked form (`chunked_masked_sums` for SFT; `klong_jax.rl.objective.chunked_token_logprobs` is the RL update's)
makes the logits from the hidden states a chunk of tokens at a time, never [B, T, V] at once.
"""
import jax
import jax.numpy as jnp


def token_losses(logits_BTV, targets_BT, z_loss_weight: float = 0.0):
    """Per-token cross-entropy [B, T] (fp32), plus z-loss (log Z)^2 * weight if asked."""
    logits = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    loss_BT = log_z_BT - target_logit_BT
    if z_loss_weight:
        loss_BT = loss_BT + z_loss_weight * jnp.square(log_z_BT)
    return loss_BT, logits


def masked_sums(logits_BTV, targets_BT, loss_mask_BT, z_loss_weight: float = 0.0) -> dict:
    """Sums (not means) over loss tokens: loss, correct predictions, token count."""
    loss_BT, logits = token_losses(logits_BTV, targets_BT, z_loss_weight)
    mask = loss_mask_BT.astype(jnp.float32)
    correct_BT = (jnp.argmax(logits, axis=-1) == targets_BT).astype(jnp.float32)
    return {"loss_sum": jnp.sum(loss_BT * mask), "correct_sum": jnp.sum(correct_BT * mask),
            "tokens": jnp.sum(mask)}


def chunked_masked_sums(logits_fn, h_BTD, targets_BT, loss_mask_BT, chunk: int, z_loss_weight: float = 0.0) -> dict:
    """masked_sums without materialising [B, T, V] logits: the sequence is cut into chunks of `chunk`
    tokens, each chunk's logits are made, reduced and dropped, and rematerialised in the backward pass.
    At GLM's 151552-token vocabulary a 32K-token row would otherwise hold ~20 GB of fp32 logits."""
    B, T, D = h_BTD.shape
    if chunk <= 0 or chunk >= T:
        return masked_sums(logits_fn(h_BTD), targets_BT, loss_mask_BT, z_loss_weight)
    pad = (-T) % chunk
    if pad:  # padded tokens carry no loss
        h_BTD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
        loss_mask_BT = jnp.pad(loss_mask_BT, ((0, 0), (0, pad)))
    n = (T + pad) // chunk
    split = lambda x: jnp.moveaxis(x.reshape((B, n, chunk) + x.shape[2:]), 1, 0)  # noqa: E731

    @jax.checkpoint
    def one(carry, xs):
        h, t, m = xs
        sums = masked_sums(logits_fn(h), t, m, z_loss_weight)
        return jax.tree.map(jnp.add, carry, sums), None

    zero = {"loss_sum": jnp.float32(0), "correct_sum": jnp.float32(0), "tokens": jnp.float32(0)}
    sums, _ = jax.lax.scan(one, zero, (split(h_BTD), split(targets_BT), split(loss_mask_BT)))
    return sums
