"""The model and optimizer the copy diagnostics (long_copy.py, name_lookup.py) train: one device, fp32, the
preset's real GLM-4.5 MoE module with the blockwise attention kernel, AdamW with a warmup-cosine schedule."""


def diagnostic_model(preset_name: str, overrides: dict | None = None):
    """(graphdef, params, rest, model config) of a freshly initialised preset on a one-device mesh."""
    import jax
    from flax import nnx

    from klong_jax.models import init_model
    from klong_jax.models.config import preset
    from klong_jax.sharding import make_mesh

    cfg = preset(preset_name, compute_dtype="float32", param_dtype="float32", attention_impl="blockwise", **(overrides or {}))
    mesh = make_mesh({"fsdp": 1})
    with jax.set_mesh(mesh):
        model = init_model(cfg, mesh)
    return (*nnx.split(model, nnx.Param, ...), cfg)


def diagnostic_optimizer(steps: int, lr: float, clip_norm: float = 0.0):
    """AdamW (b2 0.95, weight decay 0.1), 20 warmup steps, cosine to lr / 10; optional global-norm clipping."""
    import optax

    warmup = min(20, steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr / 10)
    tx = optax.adamw(schedule, b2=0.95, weight_decay=0.1)
    return optax.chain(optax.clip_by_global_norm(clip_norm), tx) if clip_norm else tx
