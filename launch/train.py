"""Training entry point.

  python launch/train.py --config=configs/sft.py:tiny --workdir=DIR [--config.model.remat_policy=full ...]

Until the SFT trainer lands this runs the foundation check: build the mesh, initialise the model
sharded, run a forward pass and one AdamW step with explicit shardings, and report what it did.
"""
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/sft.py:tiny")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/klong_run", "output directory")


def main(_):
    cfg = _CONFIG.value
    from klong_jax.runtime import setup_devices
    setup_devices(cfg.cpu_devices)
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from klong_jax.models import count_params, init_model
    from klong_jax.models.from_config import model_config_from
    from klong_jax.sharding import make_mesh, logical_to_spec
    from jax.sharding import NamedSharding

    os.makedirs(_WORKDIR.value, exist_ok=True)
    with open(os.path.join(_WORKDIR.value, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))
    model_cfg = model_config_from(cfg.model)
    mesh = make_mesh(dict(cfg.mesh.shape))
    print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} devices")
    print(f"model {cfg.variant}: {json.dumps(count_params(model_cfg))}")
    model = init_model(model_cfg, mesh, seed=cfg.seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(cfg.optimizer.lr, b1=cfg.optimizer.b1, b2=cfg.optimizer.b2,
                     weight_decay=cfg.optimizer.weight_decay)
    B, T = cfg.global_batch, cfg.seq_len
    batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", "seq"), (B, T + 1), mesh))
    ids = jax.device_put(jax.random.randint(jax.random.key(cfg.seed), (B, T + 1), 0, model_cfg.vocab_size),
                         batch_sharding)

    def loss_fn(p, tokens):
        logits = nnx.merge(graphdef, p, rest)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_state = jax.jit(tx.init)(params)
    # Moments follow their parameters; scalars (the step count) are replicated on the mesh.
    opt_shardings = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated,
                                 opt_state)
    opt_state = jax.device_put(opt_state, opt_shardings)

    @functools.partial(jax.jit, in_shardings=(param_shardings, opt_shardings, batch_sharding),
                       out_shardings=(param_shardings, opt_shardings, replicated), donate_argnums=(0, 1))
    def step(p, o, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    with jax.set_mesh(mesh):
        t0 = time.time()
        params, opt_state, loss0 = step(params, opt_state, ids)
        loss1 = jax.jit(loss_fn)(params, ids)
        jax.block_until_ready(loss1)
    same_layout = all(a.sharding == b for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(param_shardings)))
    print(f"one AdamW step on [{B}, {T}] tokens: loss {float(loss0):.4f} -> {float(loss1):.4f} "
          f"({time.time() - t0:.1f}s incl. compile); params kept their shardings: {same_layout}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
