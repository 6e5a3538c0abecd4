"""Small SFT set-ups shared by the trainer tests: synthetic trajectories, a tokenizer, a tiny config."""
import os
import subprocess
import sys

from klong_jax.data.synthetic import synthetic_corpus, texts_of
from klong_jax.data.train_tokenizer import train_sentencepiece
from klong_jax.data.trajectory import write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 384


def make_data(directory: str) -> dict:
    os.makedirs(directory, exist_ok=True)
    train = synthetic_corpus(24, seed=0, turns=(3, 8), prefix_words=12, tool_words=(3, 20), long_tool_words=60, reasoning_words=(0, 8))
    held = synthetic_corpus(6, seed=1, turns=(3, 8), prefix_words=12, tool_words=(3, 20), long_tool_words=60, reasoning_words=(0, 8))
    paths = {"train": os.path.join(directory, "train.jsonl"), "eval": os.path.join(directory, "eval.jsonl")}
    write_jsonl(paths["train"], train)
    write_jsonl(paths["eval"], held)
    paths["tokenizer"] = train_sentencepiece(texts_of(train), os.path.join(directory, "sp.model"), vocab_size=360)
    return paths


def overrides(data: dict, **extra) -> list[str]:
    """Command-line overrides that shrink configs/sft.py:tiny to test size."""
    values = {
        "cpu_devices": 8,  # the tests train on the 8-device mesh (the demo default is 2)
        "model.num_hidden_layers": 2, "model.vocab_size": 512, "model.hidden_size": 64,
        "model.n_routed_experts": 4, "train.seq_len": SEQ, "train.global_batch": 4, "train.steps": 6,
        "train.log_every": 1, "train.eval_every": 3, "train.eval_batches": 2, "checkpoint.every": 2,
        "data.train_paths": data["train"], "data.eval_paths": data["eval"], "data.tokenizer": data["tokenizer"],
        "data.pipeline.context.budget_tokens": SEQ, "data.pipeline.context.reserve_tokens": 48,
        "data.pipeline.context.max_tool_result_tokens": 64, "data.pipeline.pack_chunk": 4,
        "checkpoint.async_save": False,
    }
    values.update(extra)
    return [f"--config.{k}={v}" for k, v in values.items()]


def train_cmd(workdir: str, data: dict, **extra) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=configs/sft.py:tiny",
            f"--workdir={workdir}", *overrides(data, **extra)]


def run_train(workdir: str, data: dict, env=None, check=True, **extra):
    return subprocess.run(train_cmd(workdir, data, **extra), cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}) if not check else \
        _checked(subprocess.run(train_cmd(workdir, data, **extra), cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}))


def _checked(proc):
    if proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
