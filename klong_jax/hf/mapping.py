"""Where each parameter of ours lives in a Hugging Face checkpoint (`Glm4MoeForCausalLM`, or the dense
`LlamaForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM`, whose tensor names are a subset), and how.

Our stacked variables (leading `layers`, and for routed experts also `experts`) map to one HF tensor per
(layer, expert). torch Linear weights are [out, in]; ours are [in, ...out] (`x @ W`), so most tensors
are transposed and reshaped ("T"); norms, biases and embeddings are only reshaped ("R").
"""
import dataclasses
import math
import re
from typing import Callable

import numpy as np

from klong_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorMap:
    path: tuple[str, ...]          # our flat nnx path
    hf_key: Callable[..., str]     # (layer, expert) -> HF tensor name, for the stacked indices used
    n_stack: int                   # leading stacked dims: 0, 1 (layers) or 2 (layers, experts)
    stack_shape: tuple[int, ...]
    layer_offset: int              # HF layer index of our stack's first layer
    kind: str                      # "T": transpose then reshape; "R": reshape only
    hf_shape: tuple[int, ...]      # shape of one HF tensor
    inner_shape: tuple[int, ...]   # shape of one slice of ours

    def to_ours(self, hf_array: np.ndarray) -> np.ndarray:
        a = hf_array.T if self.kind == "T" else hf_array
        return a.reshape(self.inner_shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if self.kind == "T":
            return np.ascontiguousarray(ours.reshape(self.hf_shape[::-1]).T)
        return ours.reshape(self.hf_shape)

    def keys(self):
        """(stack index, HF key) for every HF tensor this variable is made of."""
        for idx in np.ndindex(*self.stack_shape):
            if self.n_stack == 0:
                yield idx, self.hf_key()
            elif self.n_stack == 1:
                yield idx, self.hf_key(idx[0] + self.layer_offset)
            else:
                yield idx, self.hf_key(idx[0] + self.layer_offset, idx[1])


def tensor_maps(cfg: ModelConfig) -> dict[tuple[str, ...], TensorMap]:
    D, V = cfg.hidden_size, cfg.vocab_size
    H, K, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, F = cfg.n_routed_experts, cfg.moe_intermediate_size
    maps: dict[tuple[str, ...], TensorMap] = {}

    def add(path, key, kind, hf_shape, inner_shape, stack=(), offset=0):
        maps[path] = TensorMap(path, key, len(stack), tuple(stack), offset, kind, tuple(hf_shape),
                               tuple(inner_shape))

    add(("embed_tokens",), lambda: "model.embed_tokens.weight", "R", (V, D), (V, D))
    if not cfg.tie_word_embeddings:  # tied: logits use embed_tokens, no lm_head variable
        add(("lm_head",), lambda: "lm_head.weight", "T", (V, D), (D, V))
    add(("norm", "weight"), lambda: "model.norm.weight", "R", (D,), (D,))

    stacks = [("dense_layers", cfg.num_dense_layers, 0, False),
              ("moe_layers", cfg.num_moe_layers, cfg.num_dense_layers, True)]
    for name, n, offset, moe in stacks:
        if n == 0:
            continue

        def layer(path, suffix, kind, hf_shape, inner_shape, name=name, n=n, offset=offset):
            add((name,) + path, lambda i, s=suffix: f"model.layers.{i}.{s}", kind, hf_shape, inner_shape,
                stack=(n,), offset=offset)

        layer(("input_layernorm", "weight"), "input_layernorm.weight", "R", (D,), (D,))
        layer(("post_attention_layernorm", "weight"), "post_attention_layernorm.weight", "R", (D,), (D,))
        layer(("self_attn", "q_proj"), "self_attn.q_proj.weight", "T", (H * hd, D), (D, H, hd))
        layer(("self_attn", "k_proj"), "self_attn.k_proj.weight", "T", (K * hd, D), (D, K, hd))
        layer(("self_attn", "v_proj"), "self_attn.v_proj.weight", "T", (K * hd, D), (D, K, hd))
        layer(("self_attn", "o_proj"), "self_attn.o_proj.weight", "T", (D, H * hd), (H, hd, D))
        if cfg.attention_bias:
            layer(("self_attn", "q_bias"), "self_attn.q_proj.bias", "R", (H * hd,), (H, hd))
            layer(("self_attn", "k_bias"), "self_attn.k_proj.bias", "R", (K * hd,), (K, hd))
            layer(("self_attn", "v_bias"), "self_attn.v_proj.bias", "R", (K * hd,), (K, hd))
        if cfg.use_qk_norm:
            layer(("self_attn", "q_norm", "weight"), "self_attn.q_norm.weight", "R", (hd,), (hd,))
            layer(("self_attn", "k_norm", "weight"), "self_attn.k_norm.weight", "R", (hd,), (hd,))
        if not moe:
            I = cfg.intermediate_size
            layer(("mlp", "gate_proj"), "mlp.gate_proj.weight", "T", (I, D), (D, I))
            layer(("mlp", "up_proj"), "mlp.up_proj.weight", "T", (I, D), (D, I))
            layer(("mlp", "down_proj"), "mlp.down_proj.weight", "T", (D, I), (I, D))
            continue
        layer(("mlp", "router"), "mlp.gate.weight", "T", (E, D), (D, E))
        layer(("mlp", "router_bias"), "mlp.gate.e_score_correction_bias", "R", (E,), (E,))
        for ours, theirs, hf_shape, inner in (("w_gate", "gate_proj", (F, D), (D, F)),
                                              ("w_up", "up_proj", (F, D), (D, F)),
                                              ("w_down", "down_proj", (D, F), (F, D))):
            add((name, "mlp", ours), lambda i, e, t=theirs: f"model.layers.{i}.mlp.experts.{e}.{t}.weight",
                "T", hf_shape, inner, stack=(n, E), offset=offset)
        if cfg.n_shared_experts:
            S = F * cfg.n_shared_experts
            layer(("mlp", "shared", "gate_proj"), "mlp.shared_experts.gate_proj.weight", "T", (S, D), (D, S))
            layer(("mlp", "shared", "up_proj"), "mlp.shared_experts.up_proj.weight", "T", (S, D), (D, S))
            layer(("mlp", "shared", "down_proj"), "mlp.shared_experts.down_proj.weight", "T", (D, S), (S, D))
    return maps


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def is_mtp_key(key: str, cfg: ModelConfig) -> bool:
    """GLM's multi-token-prediction layers are stored after the decoder layers; HF ignores them on load too."""
    m = _LAYER_RE.match(key)
    return cfg.model_type == "glm4_moe" and bool(m) and int(m.group(1)) >= cfg.num_hidden_layers


def total_bytes(maps, itemsize: int) -> int:
    return sum(math.prod(m.stack_shape) * math.prod(m.hf_shape) * itemsize for m in maps.values())
