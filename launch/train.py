"""Training entry point; dispatches on config.kind: SFT, one RL stage, or the whole KLong pipeline.

  python launch/train.py --config=configs/sft.py:tiny --workdir=DIR [--config.optimizer.lr=1e-3 ...]
  python launch/train.py --config=configs/rl_stage3.py:tiny --workdir=runs/klong/rl_stage3
  python launch/train.py --config=configs/klong.py:tiny --workdir=runs/klong

The same command on the same workdir resumes from the latest checkpoint.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/sft.py:tiny")
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics, TensorBoard)")


def resolve_data(cfg) -> dict:
    """Trajectory files and tokenizer from the config, or the embedded suite when none are given."""
    from klong_jax.hf.pretrained import resolve_source
    from klong_jax.training.embedded_data import prepare_embedded
    if cfg.data.train_paths:
        if not cfg.data.tokenizer:
            raise app.UsageError("--config.data.train_paths needs --config.data.tokenizer")
        return {"train": cfg.data.train_paths.split(","),
                "eval": (cfg.data.eval_paths or cfg.data.train_paths).split(","),
                "tokenizer": resolve_source(cfg.data.tokenizer)}
    paths = prepare_embedded(cfg.data.embedded)
    if cfg.data.tokenizer:
        paths["tokenizer"] = resolve_source(cfg.data.tokenizer)
    if not paths["tokenizer"]:
        raise app.UsageError("config.data.embedded.vocab_size=0 trains no tokenizer: set config.data.tokenizer "
                             "(a .model, tokenizer.json, .gguf file or pretrained:NAME)")
    return paths


def main(_):
    cfg = _CONFIG.value
    if not flags.FLAGS["verbosity"].present:  # library INFO chatter (Orbax, Grain) off unless -v is given
        logging.set_verbosity(logging.WARNING)
    from klong_jax.runtime import setup_devices
    setup_devices(cfg.cpu_devices)
    import jax

    workdir = _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))
    print(f"{cfg.kind} {cfg.variant}: {jax.device_count()} {jax.default_backend()} devices, "
          f"{jax.process_count()} process(es), workdir {workdir}", flush=True)
    if cfg.kind == "sft":
        from klong_jax.training.sft import run_sft
        summary = run_sft(cfg, workdir, resolve_data(cfg))["summary"]
    elif cfg.kind == "rl":
        from klong_jax.rl.loop import run_rl
        summary = run_rl(cfg, workdir, resolve_data(cfg))["summary"]
    elif cfg.kind == "pipeline":
        from klong_jax.rl.pipeline import run_pipeline
        summary = run_pipeline(cfg, workdir, resolve_data(cfg))["summary"]
    else:
        raise app.UsageError(f"config.kind={cfg.kind!r} is not known")
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print("summary: " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
