"""Can a model preset learn exact copying across a gap? A diagnostic for the tiny recipe's copy problem.

    JAX_PLATFORMS=cpu .venv/bin/python tools/long_copy.py --gap=300 --steps=400 [--preset=tiny --length=24 --batch=8]

Each row is A + filler + A: A is `length` random ids from 200..399, the filler `gap` random ids from 400..1399.
The loss is taken on the second A only, so it starts at ln(200) = 5.3 nats and falls only as the model learns to
find the earlier copy of the current token and emit what followed it (an induction head). Plain jit'd AdamW on one
device; the model is the preset's real GLM-4.5 MoE module with the blockwise attention kernel.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--length", type=int, default=24)
    ap.add_argument("--gap", type=int, default=300)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--log_every", type=int, default=25)
    args = ap.parse_args(argv)

    from klong_jax.runtime import setup_devices
    setup_devices(1)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from klong_jax.models import init_model
    from klong_jax.models.config import preset
    from klong_jax.sharding import make_mesh

    cfg = preset(args.preset, dtype="float32", param_dtype="float32", attention_impl="blockwise")
    mesh = make_mesh({"fsdp": 1})
    with jax.set_mesh(mesh):
        model = init_model(cfg, mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    warmup = min(20, args.steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(args.steps, warmup + 1), args.lr / 10)
    tx = optax.adamw(schedule, b2=0.95, weight_decay=0.1)
    opt_state = tx.init(params)
    L, G, B = args.length, args.gap, args.batch
    rng = np.random.default_rng(0)

    def batch():
        a_BL = rng.integers(200, 400, (B, L))
        ids_BT = np.concatenate([a_BL, rng.integers(400, 1400, (B, G)), a_BL], 1).astype(np.int32)
        mask_BT = np.zeros((B, 2 * L + G - 1), np.float32)
        mask_BT[:, L + G:] = 1.0  # targets: the second copy's tokens 2..L (the first one is not predictable)
        return jnp.asarray(ids_BT), jnp.asarray(mask_BT)

    def loss_fn(p, ids_BT, mask_BT):
        logits_BTV = nnx.merge(graphdef, p, rest)(ids_BT[:, :-1])
        logp_BTV = jax.nn.log_softmax(logits_BTV, -1)
        nll_BT = -jnp.take_along_axis(logp_BTV, ids_BT[:, 1:, None], -1)[..., 0]
        return (nll_BT * mask_BT).sum() / mask_BT.sum()

    @jax.jit
    def step(p, o, ids_BT, mask_BT):
        loss, grads = jax.value_and_grad(loss_fn)(p, ids_BT, mask_BT)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    t0 = time.time()
    for i in range(1, args.steps + 1):
        params, opt_state, loss = step(params, opt_state, *batch())
        if i % args.log_every == 0 or i == args.steps:
            print(f"{args.preset} length={L} gap={G} step {i}: copy loss {float(loss):.3f} nats "
                  f"({time.time() - t0:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
