"""The embedded default data: task suite trajectories and a SentencePiece tokenizer, made at run time.

Generated deterministically from the config's knobs into a cache directory keyed by those knobs, so a
second run (or a resumed one) reuses them. A file lock keeps concurrent processes from racing.
"""
import fcntl
import hashlib
import json
import os

from klong_jax.data.train_tokenizer import texts_of_file, train_sentencepiece
from klong_jax.tasks import vocab
from klong_jax.tasks.generate import generate_dataset


# Bumped whenever what is generated from the same knobs changes (2: task words are atomic tokenizer symbols;
# 3: the system prompt holds the template's tool-call format slot).
FORMAT = 3


def embedded_key(section) -> str:
    knobs = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    knobs = json.dumps({**knobs, "format": FORMAT}, sort_keys=True)
    return hashlib.sha256(knobs.encode()).hexdigest()[:12]


def prepare_embedded(section, cache_root: str | None = None) -> dict:
    """Returns {"train": [jsonl], "eval": [jsonl], "tokenizer": path, "dir": dir, "train_tasks": dir, ...}.

    section.vocab_size: of the SentencePiece tokenizer trained on the train split (0: none is trained and
    "tokenizer" is "": the run's data.tokenizer, e.g. a pretrained base's, is used instead)."""
    cache_root = cache_root or os.environ.get("KLONG_CACHE", os.path.expanduser("~/.cache/klong_jax"))
    root = os.path.join(cache_root, "embedded", embedded_key(section))
    os.makedirs(root, exist_ok=True)
    paths = {"dir": root,
             "train": [os.path.join(root, "train", "trajectories.jsonl")],
             "eval": [os.path.join(root, "heldout", "trajectories.jsonl")],
             "train_tasks": os.path.join(root, "train", "tasks"),
             "heldout_tasks": os.path.join(root, "heldout", "tasks"),
             "tokenizer": os.path.join(root, "tokenizer.model") if section.vocab_size else ""}
    done = os.path.join(root, "DONE")
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(done):
            print(f"generating the embedded task suite into {root} ...", flush=True)
            common = dict(difficulty=section.difficulty, length=section.length, mistake_prob=section.mistake_prob,
                          workers=min(os.cpu_count() or 1, 8))
            train = generate_dataset(os.path.join(root, "train"), section.n_train, seed=section.seed,
                                     split="train", **common)
            held = generate_dataset(os.path.join(root, "heldout"), section.n_heldout, seed=section.seed,
                                    split="heldout", **common)
            if section.vocab_size:  # 0: the run brings its own tokenizer (e.g. a pretrained base's)
                train_sentencepiece(texts_of_file(paths["train"][0]), paths["tokenizer"],
                                    vocab_size=section.vocab_size, atomic_words=vocab.TASK_WORDS)
            with open(done, "w") as f:
                json.dump({"train": train, "heldout": held}, f, indent=1)
        fcntl.flock(lock, fcntl.LOCK_UN)
    with open(done) as f:
        paths["summary"] = json.load(f)
    return paths


def tokenizer_of(data_section) -> str:
    """The tokenizer a config's data section trains with: its `tokenizer`, else the one trained on its embedded
    suite (found again from the same knobs, generated if the cache lacks it); "" when it names neither.
    `pretrained:NAME` resolves to the base's (fetched, verified) GGUF file, which holds its tokenizer."""
    from klong_jax.hf.pretrained import resolve_source
    data = dict(data_section.to_dict() if hasattr(data_section, "to_dict") else data_section)
    if data.get("tokenizer"):
        return resolve_source(data["tokenizer"])
    if data.get("embedded"):
        from ml_collections import ConfigDict
        return prepare_embedded(ConfigDict(data["embedded"]))["tokenizer"]
    return ""
