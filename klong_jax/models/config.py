"""Model configuration. Field names follow Hugging Face's `Glm4MoeConfig` so config.json maps 1:1.

Runtime fields (dtypes, attention/MoE implementation, remat, scan) are ours and never written to HF.
"""
import dataclasses
from typing import Any

# Fields of config.json that we read and write (HF names).
HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "attention_bias", "use_qk_norm",
    "max_position_embeddings", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
    "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "first_k_dense_replace",
    "rms_norm_eps", "tie_word_embeddings", "initializer_range", "num_nextn_predict_layers",
    "pad_token_id", "eos_token_id", "bos_token_id", "hidden_act",
)
REMAT_POLICIES = ("none", "full", "save_dots", "save_attention_inputs")
MOE_IMPLS = ("ragged", "dense", "megablox")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 46
    num_attention_heads: int = 96
    num_key_value_heads: int = 8
    head_dim: int = 128
    attention_bias: bool = True
    use_qk_norm: bool = False
    partial_rotary_factor: float = 0.5
    rope_theta: float = 1e6
    max_position_embeddings: int = 131072
    n_routed_experts: int = 128
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 1
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    num_nextn_predict_layers: int = 1
    hidden_act: str = "silu"
    pad_token_id: int | None = 151329
    eos_token_id: Any = (151334, 151329)
    bos_token_id: int | None = None
    # --- runtime (not HF) ---
    dtype: str = "bfloat16"          # compute dtype of activations and matmuls
    param_dtype: str = "float32"     # storage dtype of parameters
    attention_impl: str = "reference"  # reference | blockwise | pallas | ring (see kernels/)
    moe_impl: str = "ragged"         # ragged (lax.ragged_dot) | dense (all experts; test reference) | megablox
    remat_policy: str = "none"       # none | full | save_dots | save_attention_inputs
    scan_layers: bool = True         # lax.scan over stacked layers (fast compiles) vs an unrolled loop
    moe_token_chunk: int = 0         # tokens per device dispatched at once in the MoE (0: all); bounds memory

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts={self.n_routed_experts} not divisible by n_group={self.n_group}")
        if not 0 < self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl={self.moe_impl!r}; choose one of {MOE_IMPLS}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r}: only silu is implemented")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=True is not supported (GLM-4.5 unties them)")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError("first_k_dense_replace exceeds num_hidden_layers")

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def architecture(self) -> str:
        """The Hugging Face class name of this config (config.json `architectures`)."""
        return "Glm4MoeForCausalLM"

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf_dict(cls, d: dict, **runtime) -> "ModelConfig":
        if d.get("model_type") not in (None, "glm4_moe"):
            raise ValueError(f"config.json model_type={d.get('model_type')!r}, expected 'glm4_moe'")
        kw = {k: d[k] for k in HF_FIELDS if k in d}
        if kw.get("head_dim") is None:
            kw["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        # transformers 5 nests rope settings in rope_parameters; 4.x kept them at the top level.
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_type={rope['rope_type']!r} is not supported")
        kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 1e6)))
        kw["partial_rotary_factor"] = float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5)))
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = tuple(kw["eos_token_id"])
        return cls(**kw, **runtime)

    def to_hf_dict(self) -> dict:
        d = {k: getattr(self, k) for k in HF_FIELDS}
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        d.update(
            model_type="glm4_moe",
            architectures=["Glm4MoeForCausalLM"],
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta,
                             "partial_rotary_factor": self.partial_rotary_factor},
            attention_dropout=0.0,
            use_cache=True,
            dtype="float32" if self.param_dtype == "float32" else self.param_dtype,
        )
        return d


PRESETS = {
    # Trains on a CPU in minutes; vocab matches the SentencePiece tokenizer trained on the embedded suite.
    "tiny": dict(vocab_size=2048, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                 max_position_embeddings=4096, rope_theta=10000.0, pad_token_id=0, eos_token_id=(1,)),
    # About 294M total (113M active per token): the benchmark size.
    "small": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, moe_intermediate_size=512,
                  num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, head_dim=64,
                  n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1,
                  max_position_embeddings=32768, pad_token_id=0, eos_token_id=(1,)),
    # GLM-4.5-Air, 106B-A12B, as released.
    "glm45_air": dict(),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
