"""Can a model preset learn to copy from its context? A diagnostic for the tiny recipe's copy problem.

    JAX_PLATFORMS=cpu .venv/bin/python tools/long_copy.py --gap=300 --steps=400 [--preset=tiny --length=24 --batch=8]
    JAX_PLATFORMS=cpu .venv/bin/python tools/long_copy.py --mode=near --gap=4 --words=64 --steps=250

--mode=exact: each row is A + filler + A: A is `length` random ids from the word pool (`words` ids from 200), the
filler `gap` random ids from 400..1399. The loss is taken on the second A only, so it starts at ln(words) nats and
falls only as the model learns to find the earlier copy of the current token and emit what followed it (an
induction head).
--mode=near: each row is `units` units of 8 filler ids, a marker, a word, a marker, `gap` filler ids, a query
marker and the word again; the loss is on that last word: "copy the word named just before", the simplest form
of what the expert's reasoning-then-command turns ask for (`line `wheel`` ... `echo 'wheel'`).
Plain jit'd AdamW on one device; the model is the preset's real GLM-4.5 MoE module with the blockwise attention
kernel.
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
    ap.add_argument("--mode", choices=("exact", "near"), default="exact")
    ap.add_argument("--words", type=int, default=200, help="size of the word pool (ids 200..200+words-1)")
    ap.add_argument("--units", type=int, default=20, help="near mode: units per row")
    args = ap.parse_args(argv)

    from klong_jax.runtime import setup_devices
    setup_devices(1)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from tools.diag_setup import diagnostic_model, diagnostic_optimizer

    graphdef, params, rest, _ = diagnostic_model(args.preset)
    tx = diagnostic_optimizer(args.steps, args.lr)
    opt_state = tx.init(params)
    L, G, B = args.length, args.gap, args.batch
    rng = np.random.default_rng(0)

    W = args.words
    if not 0 < W <= 200:
        raise SystemExit("--words must be in 1..200 (ids 200..399; the filler uses 400..1399)")

    def exact_batch():
        a_BL = rng.integers(200, 200 + W, (B, L))
        ids_BT = np.concatenate([a_BL, rng.integers(400, 1400, (B, G)), a_BL], 1).astype(np.int32)
        mask_BT = np.zeros((B, 2 * L + G - 1), np.float32)
        mask_BT[:, L + G:] = 1.0  # targets: the second copy's tokens 2..L (the first one is not predictable)
        return jnp.asarray(ids_BT), jnp.asarray(mask_BT)

    def near_batch():
        MARK_OPEN, MARK_CLOSE, QUERY = 10, 11, 12
        unit = 8 + 3 + G + 2
        ids_BT = np.empty((B, args.units * unit), np.int32)
        for b in range(B):
            row = []
            for _ in range(args.units):
                filler = list(rng.integers(400, 1400, 8))
                w = int(rng.integers(200, 200 + W))
                row += filler + [MARK_OPEN, w, MARK_CLOSE] + list(rng.integers(400, 1400, G)) + [QUERY, w]
            ids_BT[b] = row
        mask_BT = np.zeros((B, args.units * unit - 1), np.float32)
        mask_BT[:, unit - 2::unit] = 1.0  # the target after each query marker
        return jnp.asarray(ids_BT), jnp.asarray(mask_BT)

    batch = exact_batch if args.mode == "exact" else near_batch

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
            shape = f"length={L}" if args.mode == "exact" else f"units={args.units}"
            print(f"{args.preset} {args.mode} {shape} gap={G} words={W} step {i}: copy loss {float(loss):.3f} nats "
                  f"({time.time() - t0:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
