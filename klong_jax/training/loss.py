"""Token-level cross-entropy over loss-mask tokens.

The trainer sums per-token losses and divides by the number of loss tokens in the WHOLE global batch
(all micro-batches, all devices), so every trained token weighs the same however the batch is split or
packed: micro-batching and accumulation give exactly the big-batch gradient.
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
