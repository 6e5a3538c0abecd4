"""AdamW with warmup + cosine decay, global-norm clipping, and a weight-decay mask."""
import jax
import optax

# Parameters whose path contains one of these get no weight decay: norms and biases (the router bias is
# not an nnx.Param at all, so the optimizer never sees it).
NO_DECAY_MARKERS = ("norm", "bias")


def learning_rate_schedule(opt_cfg, total_steps: int):
    warmup = int(opt_cfg.warmup_steps)
    decay_steps = max(total_steps, warmup + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt_cfg.lr, warmup_steps=warmup, decay_steps=decay_steps,
        end_value=opt_cfg.lr * opt_cfg.final_lr_fraction)


def decay_mask(params):
    """True where weight decay applies, for an nnx.State / pure dict of parameters."""
    def keep(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return not any(marker in name for name in names for marker in NO_DECAY_MARKERS)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(opt_cfg.clip_norm) if opt_cfg.clip_norm else optax.identity(),
        optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                    weight_decay=opt_cfg.weight_decay, mask=decay_mask),
    )

