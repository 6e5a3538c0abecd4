"""Trajectory-splitting SFT. Variants: tiny (CPU, minutes, random init), smol (SmolLM2-135M-Instruct upcycled to
MoE, CPU), small (benchmarks), glm45_air (TPU pods).

  python launch/train.py --config=configs/sft.py:tiny --workdir=DIR --config.optimizer.lr=1e-3
Every value can be overridden from the command line; an unknown key is an error listing the valid ones.
"""
import dataclasses

from ml_collections import ConfigDict

from klong_jax.models.config import preset
from klong_jax.models.upcycle import UpcycleConfig, upcycled_config

VARIANTS = ("tiny", "smol", "small", "glm45_air")

# The pretrained base each variant starts from ("": random init). `pretrained:NAME` is a base of the registry in
# klong_jax/hf/pretrained.py, fetched (and checksummed) into ~/.cache/klong_jax on first use.
INIT_FROM = {"tiny": "", "smol": "pretrained:smollm2-135m-instruct", "small": "", "glm45_air": ""}

# Model preset of klong_jax/models/config.py per variant, and how it is upcycled to MoE (layers 0: not at all).
# smol: SmolLM2-135M-Instruct (30 dense layers) with its last 4 FFNs upcycled to 4 experts, top 2 (each token
# runs 2 expert copies of the FFN in those layers: 116.8M active parameters against 106.2M dense; BUILD_NOTES.md).
PRESET = {"tiny": "tiny", "smol": "smollm2_135m", "small": "small", "glm45_air": "glm45_air"}
UPCYCLE = {"tiny": {}, "smol": dict(layers=4, experts=4, top_k=2, router_std=0.02, seed=0), "small": {},
           "glm45_air": {}}

MESHES = {
    "tiny": {"data": 1, "fsdp": -1, "expert": 1, "context": 1, "tensor": 1},
    "smol": {"data": 1, "fsdp": -1, "expert": 1, "context": 1, "tensor": 1},
    "small": {"data": 1, "fsdp": -1, "expert": 1, "context": 1, "tensor": 1},
    # Experts over 8 devices (16 experts each), everything else FSDP over all devices.
    "glm45_air": {"data": 1, "fsdp": -1, "expert": 8, "context": 1, "tensor": 1},
}

RUNTIME = {
    "tiny": dict(compute_dtype="float32", param_dtype="float32", attention_impl="blockwise"),
    # bf16 compute, fp32 master weights: on this AMX CPU a bf16 matmul is 4.8x an fp32 one, and the SFT step of the
    # top 8 layers (2 x 1,024 tokens, 2 devices) takes 8.6 s against 14.0 s in fp32 (BUILD_NOTES, session 9).
    "smol": dict(compute_dtype="bfloat16", param_dtype="float32", attention_impl="blockwise"),
    "small": dict(compute_dtype="bfloat16", param_dtype="float32", attention_impl="blockwise"),
    "glm45_air": dict(compute_dtype="bfloat16", param_dtype="float32", remat_policy="full", attention_impl="pallas",
                      moe_token_chunk=4096),
}

# The rollout sampler's copy of the policy (klong_jax.agent.RolloutConfig; RL rollouts and held-out evaluation):
# devices (0: all, the trainer's mesh), first_device (the sampler's devices start there), dtype ("": the model's),
# session_chunk (tokens per row of a prefill call).
# smol: bf16 on one device; a turn appends ~15-50 tokens per episode, so 32-token chunks (a 128-token chunk computes
# 4x the padding). Decode step, 8 episodes, 1,792 cache slots: 250 ms on the 2-device fp32 mesh, ~150 ms on one
# device (BUILD_NOTES, session 9).
# glm45_air: a bf16 copy. Its compute is bf16 already (so is the KV cache), and the trainer's fp32 params are donated
# every step, so the sampler holds a copy anyway: bf16 halves it (106e9 params: 212 GB instead of 424 GB over the
# chips) and halves the bytes every decode step reads; sharing chips with the trainer (launch/plan.py's `colocated`)
# needs that room.
ROLLOUT = {
    "tiny": dict(devices=0, first_device=0, dtype="", session_chunk=128),
    "smol": dict(devices=1, first_device=0, dtype="bfloat16", session_chunk=32),
    "small": dict(devices=0, first_device=0, dtype="", session_chunk=128),
    "glm45_air": dict(devices=0, first_device=0, dtype="bfloat16", session_chunk=128),
}

# Training schedule per variant. seq_len is also the context budget of the ContextPolicy (tokens per window).
# smol: a pretrained model needs tens of steps, not hundreds; its top 8 layers train (config.trainable: 14 s per
# 2 x 1,024-token step on 2 CPU cores against 23 s for every parameter), at a larger lr than full fine-tuning,
# for 64 steps: at 32 greedy turns were still malformed, at 64 well formed (BUILD_NOTES.md, session 7).
TRAIN = {
    "tiny": dict(steps=300, global_batch=4, seq_len=1024, log_every=10, eval_every=50, eval_batches=8,
                 loss_chunk=0, checkpoint_every=50),
    "smol": dict(steps=64, global_batch=2, seq_len=1024, log_every=1, eval_every=32, eval_batches=4,
                 loss_chunk=0, checkpoint_every=32),
    "small": dict(steps=2000, global_batch=64, seq_len=8192, log_every=50, eval_every=500, eval_batches=8,
                  loss_chunk=4096, checkpoint_every=500),
    "glm45_air": dict(steps=2000, global_batch=256, seq_len=131072, log_every=50, eval_every=500, eval_batches=8,
                      loss_chunk=4096, checkpoint_every=500),
}
OPTIMIZER = {
    "tiny": dict(lr=3e-3, warmup_steps=20, weight_decay=0.1),
    "smol": dict(lr=2e-4, warmup_steps=2, weight_decay=0.0),
    "small": dict(lr=3e-4, warmup_steps=200, weight_decay=0.1),
    "glm45_air": dict(lr=3e-4, warmup_steps=200, weight_decay=0.1),
}
# What trains, per variant (klong_jax/training/trainable.py: TrainableConfig; shared by SFT and every RL stage).
# top_layers: the top N decoder layers and the final norm train (0: every parameter, the default);
# embeddings: with top_layers, embed_tokens and lm_head (tied or not) train too.
TRAINABLE = {
    "tiny": dict(top_layers=0, embeddings=False),
    "smol": dict(top_layers=8, embeddings=False),
    "small": dict(top_layers=0, embeddings=False),
    "glm45_air": dict(top_layers=0, embeddings=False),
}
# The embedded task suite per variant. vocab_size: of the SentencePiece tokenizer trained on it (0: none is trained,
# the variant brings its own tokenizer in data.tokenizer). Tiny and smol: two-section tasks (length 6, ~13 expert
# turns); the others: three-section tasks (length 16, ~26 turns).
EMBEDDED = {
    "tiny": dict(n_train=512, n_heldout=8, length=6, vocab_size=2048),
    "smol": dict(n_train=256, n_heldout=8, length=6, vocab_size=0),
    "small": dict(n_train=256, n_heldout=32, length=16, vocab_size=32000),
    "glm45_air": dict(n_train=256, n_heldout=32, length=16, vocab_size=151552),
}
# Whether SFT keeps the expert's reasoning (`<think>` blocks) in its trajectories (data.pipeline.keep_reasoning).
# smol: without it, 64 steps give a model that acts (held-out score 0.172 against 0.006 with it; turns of ~38
# instead of ~61 tokens; BUILD_NOTES session 8): a 135M model copies the next item from the spec more reliably than
# it counts items in its reasoning.
KEEP_REASONING = {"tiny": True, "smol": False, "small": True, "glm45_air": True}
TOKENIZER = {"tiny": "", "smol": "pretrained:smollm2-135m-instruct", "small": "", "glm45_air": ""}


def model_section(variant: str) -> ConfigDict:
    """config.model: the FINAL architecture's ModelConfig fields, plus the `upcycle` sub-section saying how it
    is reached from the dense base (klong_jax/models/upcycle.py)."""
    dense = preset(PRESET[variant], **RUNTIME[variant])
    up = UpcycleConfig(**UPCYCLE[variant])
    section = ConfigDict(dataclasses.asdict(upcycled_config(dense, up) if up.enabled else dense))
    section.upcycle = ConfigDict(dataclasses.asdict(up))
    return section


def get_config(variant: str = "tiny") -> ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    c = ConfigDict()
    c.kind = "sft"
    c.variant = variant
    c.seed = 0
    # Emulated devices when running on CPU (ignored on TPU/GPU). Two: the step is still sharded (fsdp 2), and
    # emulating more devices than a laptop has cores only adds collectives (tiny step on 2 cores: 8 devices
    # 8.0 s, 2 devices 1.4 s; BUILD_NOTES.md). The tests use the 8-device mesh.
    c.cpu_devices = 2
    # A Hugging Face directory, a .gguf file, an Orbax model checkpoint, or pretrained:NAME ("": random init).
    c.init_from = INIT_FROM[variant]
    c.model = model_section(variant)
    c.mesh = ConfigDict({"shape": MESHES[variant]})

    t = TRAIN[variant]
    budget = t["seq_len"]
    c.train = ConfigDict(dict(
        steps=t["steps"], global_batch=t["global_batch"], micro_batches=1, seq_len=budget, log_every=t["log_every"],
        eval_every=t["eval_every"], eval_batches=t["eval_batches"], z_loss=0.0, max_nonfinite_steps=5,
        loss_chunk=t["loss_chunk"]))  # tokens per logits chunk (0: whole row)
    c.optimizer = ConfigDict(dict(**OPTIMIZER[variant], final_lr_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8,
                                  clip_norm=1.0))
    # What trains (TrainableConfig fields, checked when the run starts); RL stages share this section.
    c.trainable = ConfigDict(dict(TRAINABLE[variant]))
    c.checkpoint = ConfigDict(dict(every=t["checkpoint_every"], keep_last=2, keep_every=0, async_save=True))
    # How launch/eval.py runs this config's model as an agent: greedy, with the budgets of the last RL stage.
    from configs.rl_common import STAGES, AGENT
    timeout_s, max_turns, max_tokens = STAGES[variant][3]
    c.agent = ConfigDict(dict(timeout_s=timeout_s, max_turns=max_turns, max_total_tokens=max_tokens,
                              max_new_tokens_per_turn=AGENT[variant]["max_new_tokens_per_turn"], temperature=0.0,
                              disk_mib=AGENT[variant]["disk_mib"],
                              one_call_per_turn=AGENT[variant]["one_call_per_turn"]))

    c.rollout = ConfigDict(dict(ROLLOUT[variant], mesh={}))

    c.data = ConfigDict()
    # Trajectory JSONL files (comma-separated globs); empty: the embedded task suite below.
    c.data.train_paths = ""
    c.data.eval_paths = ""
    # SentencePiece .model, tokenizer.json, a .gguf file or pretrained:NAME; empty: trained on the embedded suite.
    c.data.tokenizer = TOKENIZER[variant]
    c.data.chat_template = "auto"   # "auto" (from the tokenizer's special tokens) | "glm45" | "chatml"
    c.data.embedded = ConfigDict(dict(**EMBEDDED[variant], seed=0, difficulty=1, mistake_prob=0.1))
    # rename_prob: share of training trajectories whose names are renamed consistently (data/renaming.py), so that
    # only copying them from the context is right; rename_words: comma list ("" with the embedded suite: its task
    # words). Off by default: on the tiny model it did not start copying (BUILD_NOTES.md, session 5).
    c.data.pipeline = ConfigDict(dict(
        source="jsonl", packing="shared_prefix", pack_chunk=8, shuffle=True, num_epochs=None, on_error="raise",
        train_overlap=False, num_workers=0, read_threads=1, rename_prob=0.0, rename_words="",
        keep_reasoning=KEEP_REASONING[variant],
        context=dict(budget_tokens=budget, reserve_tokens=min(256, budget // 4), drop_fraction=0.3,
                     drop_unit="turns", max_tool_result_tokens=budget // 4)))
    return c
