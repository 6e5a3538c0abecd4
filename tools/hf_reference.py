"""Hugging Face reference side of the parity tests. Runs in a separate Python 3.11 env with
torch==2.13.0 (CPU) and transformers 5.x — never in the project env (no torch there).

  make-fixtures OUT_DIR [CASE ...]
                          build tiny random models (Glm4MoeForCausalLM: CASES; LlamaForCausalLM /
                          Qwen2ForCausalLM / Qwen3ForCausalLM: DENSE_CASES), or only the named cases, save them
                          with save_pretrained, and record their fp32 logits for fixed inputs (inputs.npy, logits.npy)
  logits MODEL_DIR IDS.npy OUT.npy
                          load MODEL_DIR with transformers (the class its config.json names) and write its fp32
                          logits for IDS (round trip check)
"""
import os
import sys

import numpy as np
import torch
from transformers import (AutoModelForCausalLM, Glm4MoeConfig, Glm4MoeForCausalLM, LlamaConfig, LlamaForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
            routed_scaling_factor=1.0, attention_bias=True, use_qk_norm=False, rms_norm_eps=1e-5,
            max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, eos_token_id=[1])

# Each case flips the features the issue names; every case also has a non-zero e_score_correction_bias.
CASES = {
    "base": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)),
    "qknorm_fullrope": dict(use_qk_norm=True,
                            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=1.0)),
    "groups_noNorm_scaled": dict(n_group=4, topk_group=2, num_experts_per_tok=3, norm_topk_prob=False,
                                 routed_scaling_factor=2.5,
                                 rope_parameters=dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.5)),
    "nobias_dense2_shared2": dict(attention_bias=False, first_k_dense_replace=2, n_shared_experts=2, num_hidden_layers=4,
                                  rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)),
    "dense0_groups_qknorm": dict(first_k_dense_replace=0, n_group=2, topk_group=1, use_qk_norm=True, n_shared_experts=2,
                                 routed_scaling_factor=0.7,
                                 rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)),
}

# Dense Llama-family cases, a few KB each: tied and untied heads, head_dim absent (hidden / heads) and explicit,
# q/k/v biases (qwen2) and per-head qk RMSNorm (qwen3).
DENSE_BASE = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2)
DENSE_CASES = {
    "llama_tied": (LlamaConfig, LlamaForCausalLM,
                   dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=100000.0))),
    "llama_untied_headdim": (LlamaConfig, LlamaForCausalLM,
                             dict(tie_word_embeddings=False, head_dim=8, num_hidden_layers=3,
                                  rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    "qwen2_bias_tied": (Qwen2Config, Qwen2ForCausalLM,
                        dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    "qwen3_qknorm": (Qwen3Config, Qwen3ForCausalLM,
                     dict(tie_word_embeddings=False, head_dim=8,
                          rope_parameters=dict(rope_type="default", rope_theta=1e6))),
}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (HF inits norms to 1 and biases to 0, which would hide layout bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def logits_of(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.float().numpy()


def make_fixtures(out_dir: str, only: list[str]) -> None:
    unknown = set(only) - set(CASES) - set(DENSE_CASES)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; choose from {sorted(CASES) + sorted(DENSE_CASES)}")
    rng = np.random.default_rng(0)
    cases = [(name, Glm4MoeConfig, Glm4MoeForCausalLM, {**BASE, **o}) for name, o in CASES.items()]
    cases += [(name, c, m, {**DENSE_BASE, **o}) for name, (c, m, o) in DENSE_CASES.items()]
    for i, (name, config_cls, model_cls, kwargs) in enumerate(cases):
        cfg = config_cls(**kwargs)
        # Draw the inputs of every case in order, so the cases built stay identical when only some are.
        ids = rng.integers(0, cfg.vocab_size, size=(2, 12)).astype(np.int32)
        if only and name not in only:
            continue
        torch.manual_seed(i)
        model = model_cls(cfg).float().eval()
        randomise(model, seed=100 + i)
        case_dir = os.path.join(out_dir, name)
        model.save_pretrained(case_dir)
        np.save(os.path.join(case_dir, "inputs.npy"), ids)
        np.save(os.path.join(case_dir, "logits.npy"), logits_of(model, ids))
        print(f"{name}: {sum(p.numel() for p in model.parameters())} params -> {case_dir}")
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("Generated by `tools/hf_reference.py make-fixtures` (transformers "
                f"{__import__('transformers').__version__}, torch {torch.__version__}). Do not edit.\n")


def main(argv):
    if argv[1] == "make-fixtures":
        make_fixtures(argv[2], argv[3:])
    elif argv[1] == "logits":
        model = AutoModelForCausalLM.from_pretrained(argv[2], dtype=torch.float32).eval()
        np.save(argv[4], logits_of(model, np.load(argv[3])))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
