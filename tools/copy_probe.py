"""Does a trained model copy task words from its context? Teacher-forced loss on held-out expert trajectories,
split into the assistant tokens that are task words (names the spec gives: directories, files, values) and all
other assistant tokens. Task words are also split into near ones (the same id occurs within the previous --near
tokens: the expert's reasoning names the item right before the call that uses it) and far ones (only the spec
has it).

    JAX_PLATFORMS=cpu .venv/bin/python tools/copy_probe.py --workdir=RUN [--step=300 --turns=7 --trajectories=6]

RUN is a training workdir of the embedded suite (its config.json names the data knobs and the model). A model
that copies brings task-word loss near the other tokens' loss; one that guesses from word frequencies stays
near log(number of plausible words), about 3 nats for the embedded vocabulary.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--turns", type=int, default=7, help="assistant turns of each trajectory scored")
    parser.add_argument("--trajectories", type=int, default=6)
    parser.add_argument("--near", type=int, default=32, help="tokens back that count as near for a task word")
    args = parser.parse_args(argv)

    from klong_jax.runtime import setup_devices
    setup_devices(1)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from ml_collections import ConfigDict

    from klong_jax.data.chat_template import make_chat_template
    from klong_jax.data.tokenizer import load_tokenizer
    from klong_jax.data.trajectory import read_jsonl
    from klong_jax.models.from_config import model_config_from
    from klong_jax.sharding import make_mesh
    from klong_jax.tasks import vocab
    from klong_jax.training.embedded_data import prepare_embedded, tokenizer_of
    from klong_jax.training.state import load_trained_model

    with open(os.path.join(args.workdir, "config.json")) as f:
        cfg = json.load(f)
    data = prepare_embedded(ConfigDict(cfg["data"]["embedded"]))
    mesh = make_mesh({"fsdp": 1})
    with jax.set_mesh(mesh):
        model, step = load_trained_model(args.workdir, model_config_from(cfg["model"]), mesh, step=args.step)
    tokenizer = load_tokenizer(tokenizer_of(cfg["data"]))
    template = make_chat_template(tokenizer, cfg["data"].get("chat_template", "auto"))
    words = set(vocab.TASK_WORDS)
    # Task words also split by where their last earlier occurrence is: within the previous NEAR tokens (the
    # expert's reasoning names the item just before the call that uses it) or farther back (the spec).
    losses = {"task_word": [], "other": [], "task_word_near": [], "task_word_far": []}
    for trajectory in list(read_jsonl(data["eval"][0]))[:args.trajectories]:
        kept, turns = [], 0
        for m in trajectory.messages:
            turns += m.role == "assistant"
            if turns > args.turns:
                break
            kept.append(m)
        rendered = template.render(kept)
        ids_1T = jnp.asarray(rendered.input_ids[None])
        logp_TV = jax.nn.log_softmax(model(ids_1T[:, :-1]).astype(jnp.float32), -1)[0]
        targets_T = np.asarray(ids_1T[0, 1:])
        loss_T = -np.asarray(jnp.take_along_axis(logp_TV, jnp.asarray(targets_T)[:, None], -1))[:, 0]
        for i in np.flatnonzero(rendered.trainable[1:]):
            kind = "task_word" if tokenizer.decode([int(targets_T[i])]).strip() in words else "other"
            losses[kind].append(float(loss_T[i]))
            if kind == "task_word":
                near = targets_T[i] in targets_T[max(0, i - args.near):i]
                losses["task_word_near" if near else "task_word_far"].append(float(loss_T[i]))
    report = {"workdir": args.workdir, "step": int(step),
              **{f"{k}_loss": float(np.mean(v)) if v else None for k, v in losses.items()},
              **{f"{k}_tokens": len(v) for k, v in losses.items()}}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
