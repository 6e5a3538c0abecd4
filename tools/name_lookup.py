"""Can a model preset learn to look names up in its context when the names are all it is trained on?

    JAX_PLATFORMS=cpu .venv/bin/python tools/name_lookup.py --steps=300 [--batch=4 --rename_prob=1.0 --lr=3e-3]

A diagnostic for the tiny recipe's copy problem (BUILD_NOTES.md). Rows are the tiny SFT config's packed rows of
the embedded suite, with every trajectory's task words renamed at random (data/renaming.py), and the loss is
kept on the assistant's task-word targets only: no other token competes for the model, and no word frequency
helps, so the loss falls below ln(64) = 4.16 nats only as the model finds names in its context. Evaluated on the
held-out trajectories (not renamed): name loss, and the share of probability on names the context holds
against the share that ignoring the context gives (`in_context` vs `in_context_uniform`).
One device, plain jit'd AdamW, the preset's real GLM-4.5 MoE module with the blockwise attention kernel.
"""
import argparse
import ast
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rename_prob", type=float, default=1.0)
    ap.add_argument("--eval_every", type=int, default=100)
    ap.add_argument("--targets", choices=("all", "near"), default="all",
                    help="near: train only on names whose id occurs within the previous 32 tokens of the row")
    ap.add_argument("--model_overrides", default="", help="preset fields, e.g. num_key_value_heads=4,hidden_size=256")
    ap.add_argument("--time_limit_s", type=float, default=0.0, help="stop (and evaluate) after this long")
    args = ap.parse_args(argv)

    from klong_jax.runtime import setup_devices
    setup_devices(1)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from configs.sft import get_config
    from klong_jax.data.pipeline import make_dataset
    from klong_jax.data.renaming import word_ids
    from klong_jax.data.tokenizer import load_tokenizer
    from klong_jax.tasks import vocab
    from klong_jax.training.embedded_data import prepare_embedded
    from klong_jax.training.sft import data_config
    from tools.diag_setup import diagnostic_model, diagnostic_optimizer

    cfg = get_config("tiny")
    cfg.data.pipeline.rename_prob = args.rename_prob
    paths = prepare_embedded(cfg.data.embedded)
    words = word_ids(load_tokenizer(paths["tokenizer"]), vocab.TASK_WORDS)
    is_word_V = np.zeros(cfg.model.vocab_size, bool)
    is_word_V[words] = True

    def near_mask(ids_BT, targets_BT, near=32):
        """Targets whose id occurs among the `near` input tokens up to and including their position."""
        out = np.zeros(ids_BT.shape, bool)
        for k in range(near):
            out[:, k:] |= ids_BT[:, :ids_BT.shape[1] - k] == targets_BT[:, k:]
        return out

    def batches(split, batch):
        ds = make_dataset(data_config(cfg, split=split, paths=paths["train" if split == "train" else "eval"],
                                      tokenizer_path=paths["tokenizer"], batch_size=batch))
        for b in ds:
            b = {k: np.asarray(v) for k, v in b.items()}
            b["loss_mask"] = (b["loss_mask"] > 0) & is_word_V[b["targets"]]
            if split == "train" and args.targets == "near":
                b["loss_mask"] &= near_mask(b["input_ids"], b["targets"])
            yield b

    held = list(batches("eval", 4))
    overrides = {k: ast.literal_eval(v) for k, v in (kv.split("=") for kv in args.model_overrides.split(",") if kv)}
    graphdef, params, rest, _ = diagnostic_model(args.preset, overrides)
    tx = diagnostic_optimizer(args.steps, args.lr, clip_norm=1.0)
    opt_state = tx.init(params)
    word_mask_V = jnp.asarray(is_word_V)

    def forward(p, b):
        logits_BTV = nnx.merge(graphdef, p, rest)(b["input_ids"], positions_BT=b["positions"],
                                                  doc_ids_BT=b["doc_ids"], window_ids_BT=b["window_ids"])
        return jax.nn.log_softmax(logits_BTV.astype(jnp.float32), -1)

    def loss_fn(p, b):
        logp_BTV = forward(p, b)
        nll_BT = -jnp.take_along_axis(logp_BTV, b["targets"][..., None], -1)[..., 0]
        mask_BT = b["loss_mask"].astype(jnp.float32)
        return (nll_BT * mask_BT).sum() / jnp.maximum(mask_BT.sum(), 1.0)

    @jax.jit
    def step(p, o, b):
        loss, grads = jax.value_and_grad(loss_fn)(p, b)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    @jax.jit
    def eval_stats(p, b):
        """Sums over name targets: nll, probability on names seen earlier in the same document, and the
        share of names seen earlier (what a model that ignores its context puts there)."""
        logp_BTV = forward(p, b)
        nll_BT = -jnp.take_along_axis(logp_BTV, b["targets"][..., None], -1)[..., 0]
        # seen_BTV: name v occurred at or before position t of the same document.
        onehot_BTV = jax.nn.one_hot(b["input_ids"], logp_BTV.shape[-1], dtype=jnp.float32) * word_mask_V
        same_doc_BTT = (b["doc_ids"][:, :, None] == b["doc_ids"][:, None, :]) & jnp.tril(
            jnp.ones((b["doc_ids"].shape[1],) * 2, bool))
        seen_BTV = jnp.einsum("bts,bsv->btv", same_doc_BTT.astype(jnp.float32), onehot_BTV) > 0
        mass_BT = jnp.sum(jnp.exp(logp_BTV) * seen_BTV, -1)
        uniform_BT = seen_BTV.sum(-1) / word_mask_V.sum()
        m = b["loss_mask"].astype(jnp.float32)
        return jnp.stack([(nll_BT * m).sum(), (mass_BT * m).sum(), (uniform_BT * m).sum(), m.sum()])

    def evaluate(p):
        s = sum(np.asarray(eval_stats(p, {k: jnp.asarray(v) for k, v in b.items()})) for b in held)
        return {"name_loss": s[0] / s[3], "in_context": s[1] / s[3], "in_context_uniform": s[2] / s[3],
                "eval_targets": int(s[3])}

    t0, train = time.time(), batches("train", args.batch)
    for i in range(1, args.steps + 1):
        params, opt_state, loss = step(params, opt_state, {k: jnp.asarray(v) for k, v in next(train).items()})
        out_of_time = args.time_limit_s and time.time() - t0 > args.time_limit_s
        if i % args.eval_every == 0 or i == args.steps or out_of_time:
            print(json.dumps({"preset": args.preset, "overrides": args.model_overrides, "targets": args.targets,
                              "step": i,
                              "train_name_loss": round(float(loss), 4),
                              **{k: round(float(v), 4) for k, v in evaluate(params).items()},
                              "elapsed_s": round(time.time() - t0, 1)}), flush=True)
        if out_of_time:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
