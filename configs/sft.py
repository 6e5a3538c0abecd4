"""Trajectory-splitting SFT. Variants: tiny (CPU, minutes), small (benchmarks), glm45_air (TPU pods).

  python launch/train.py --config=configs/sft.py:tiny --workdir=DIR --config.optimizer.lr=1e-3
Every value can be overridden from the command line; an unknown key is an error listing the valid ones.
"""
import dataclasses

from ml_collections import ConfigDict

from klong_jax.models.config import preset

VARIANTS = ("tiny", "small", "glm45_air")

MESHES = {
    "tiny": {"data": 1, "fsdp": -1, "expert": 1, "context": 1, "tensor": 1},
    "small": {"data": 1, "fsdp": -1, "expert": 1, "context": 1, "tensor": 1},
    # Experts over 8 devices (16 experts each), everything else FSDP over all devices.
    "glm45_air": {"data": 1, "fsdp": -1, "expert": 8, "context": 1, "tensor": 1},
}

RUNTIME = {
    "tiny": dict(compute_dtype="float32", param_dtype="float32", attention_impl="blockwise"),
    "small": dict(compute_dtype="bfloat16", param_dtype="float32", attention_impl="blockwise"),
    "glm45_air": dict(compute_dtype="bfloat16", param_dtype="float32", remat_policy="full", attention_impl="pallas",
                      moe_token_chunk=4096),
}


def model_section(variant: str) -> ConfigDict:
    return ConfigDict(dataclasses.asdict(preset(variant, **RUNTIME[variant])))


def get_config(variant: str = "tiny") -> ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    tiny = variant == "tiny"
    c = ConfigDict()
    c.kind = "sft"
    c.variant = variant
    c.seed = 0
    # Emulated devices when running on CPU (ignored on TPU/GPU). Two: the step is still sharded (fsdp 2), and
    # emulating more devices than a laptop has cores only adds collectives (tiny step on 2 cores: 8 devices
    # 8.0 s, 2 devices 1.4 s; BUILD_NOTES.md). The tests use the 8-device mesh.
    c.cpu_devices = 2
    c.init_from = ""           # a Hugging Face directory or an Orbax model checkpoint
    c.model = model_section(variant)
    c.mesh = ConfigDict({"shape": MESHES[variant]})

    budget = {"tiny": 1024, "small": 8192, "glm45_air": 131072}[variant]
    c.train = ConfigDict(dict(
        steps=300 if tiny else 2000, global_batch=4 if tiny else 64 if variant == "small" else 256,
        micro_batches=1, seq_len=budget, log_every=10 if tiny else 50, eval_every=50 if tiny else 500,
        eval_batches=8, z_loss=0.0, max_nonfinite_steps=5,
        loss_chunk=0 if tiny else 4096))  # tokens per logits chunk (0: whole row)
    c.optimizer = ConfigDict(dict(lr=3e-3 if tiny else 3e-4, warmup_steps=20 if tiny else 200,
                                  final_lr_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                                  clip_norm=1.0))
    c.checkpoint = ConfigDict(dict(every=50 if tiny else 500, keep_last=2, keep_every=0, async_save=True))

    c.data = ConfigDict()
    # Trajectory JSONL files (comma-separated globs); empty: the embedded task suite below.
    c.data.train_paths = ""
    c.data.eval_paths = ""
    c.data.tokenizer = ""      # SentencePiece .model or tokenizer.json; empty: trained on the embedded suite
    c.data.chat_template = "auto"   # "auto" (from the tokenizer's special tokens) | "glm45" | "chatml"
    # Tiny: two-section tasks (length 6, ~13 expert turns) that a 4-layer model learns to carry out on a CPU; the
    # others: three-section tasks (length 16, ~26 turns).
    c.data.embedded = ConfigDict(dict(n_train=512 if tiny else 256, n_heldout=8 if tiny else 32, seed=0, difficulty=1,
                                      length=6 if tiny else 16, mistake_prob=0.1, vocab_size=c.model.vocab_size))
    # rename_prob: share of training trajectories whose names are renamed consistently (data/renaming.py), so that
    # only copying them from the context is right; rename_words: comma list ("" with the embedded suite: its task
    # words). Off by default: on the tiny model it did not start copying (BUILD_NOTES.md, session 5).
    c.data.pipeline = ConfigDict(dict(
        source="jsonl", packing="shared_prefix", pack_chunk=8, shuffle=True, num_epochs=None, on_error="raise",
        train_overlap=False, num_workers=0, read_threads=1, rename_prob=0.0, rename_words="",
        context=dict(budget_tokens=budget, reserve_tokens=min(256, budget // 4), drop_fraction=0.3,
                     drop_unit="turns", max_tool_result_tokens=budget // 4)))
    return c
