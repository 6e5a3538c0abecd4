"""Model configuration. Field names follow Hugging Face's configs (`Glm4MoeConfig`, `LlamaConfig`,
`Qwen2Config`, `Qwen3Config`) so config.json maps 1:1.

One decoder class runs every `model_type`: GLM-4.5 MoE (dense layers, then MoE layers) and the dense
Llama family, which is the same decoder with every layer dense (`first_k_dense_replace == num_hidden_layers`),
full rotary and its own bias / qk-norm flags (llama: neither; qwen2: q/k/v bias; qwen3: per-head qk RMSNorm).

Runtime fields (dtypes, attention/MoE implementation, remat, scan) are ours and never written to HF.
Dtype fields accept a string or a numpy/jnp dtype and hold its canonical name ("float32", "bfloat16").
"""
import dataclasses
from typing import Any

import jax.numpy as jnp

# Fields of a glm4_moe config.json that we read and write (HF names).
HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "attention_bias", "use_qk_norm",
    "max_position_embeddings", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
    "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "first_k_dense_replace",
    "rms_norm_eps", "tie_word_embeddings", "initializer_range", "num_nextn_predict_layers",
    "pad_token_id", "eos_token_id", "bos_token_id", "hidden_act",
)
# Fields of a dense (llama / qwen2 / qwen3) config.json that we read and write.
DENSE_HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "initializer_range", "pad_token_id", "eos_token_id", "bos_token_id", "hidden_act",
)
# model_type -> (HF class, attention_bias, use_qk_norm) of the dense families; None: free (glm4_moe).
MODEL_TYPES = {
    "glm4_moe": ("Glm4MoeForCausalLM", None, None),
    "llama": ("LlamaForCausalLM", False, False),
    "qwen2": ("Qwen2ForCausalLM", True, False),
    "qwen3": ("Qwen3ForCausalLM", False, True),
}
# Fields that decide the parameters' shapes or the function the model computes (not token ids, context
# length or init scale). MoE fields only count where there are MoE layers.
ARCH_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "attention_bias", "use_qk_norm", "partial_rotary_factor", "rope_theta",
    "first_k_dense_replace", "rms_norm_eps", "tie_word_embeddings", "hidden_act",
)
DENSE_ARCH_FIELDS = ("intermediate_size",)
MOE_ARCH_FIELDS = ("moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
                   "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor")
# Our runtime fields: what a loader may set on top of a checkpoint's architecture.
RUNTIME_FIELDS = ("compute_dtype", "param_dtype", "attention_impl", "moe_impl", "remat_policy", "scan_layers",
                  "moe_token_chunk")
REMAT_POLICIES = ("none", "full", "save_dots", "save_attention_inputs")
MOE_IMPLS = ("ragged", "dense", "megablox")


def runtime_overrides(where: str, overrides: dict) -> dict:
    """The runtime fields a loader was given (None values dropped), checked.

    A bare `dtype` is ambiguous (storage or compute?) and raises TypeError saying which name to use;
    any other non-runtime field raises TypeError listing the valid ones (a checkpoint fixes the shapes).
    """
    if "dtype" in overrides:
        raise TypeError(f"{where}: dtype={overrides['dtype']!r} is ambiguous; pass param_dtype= (parameter "
                        "storage) or compute_dtype= (activations and matmuls)")
    unknown = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if unknown:
        raise TypeError(f"{where}: unexpected keyword arguments {unknown}; the runtime fields are "
                        f"{list(RUNTIME_FIELDS)}")
    return {k: v for k, v in overrides.items() if v is not None}


def upgrade_legacy_fields(d: dict) -> dict:
    """A copy of a saved ModelConfig dict (Orbax model_config JSON, a run's config.model) in today's names:
    before the rename, the compute dtype was saved as "dtype" (it always meant compute); a compute_dtype
    given beside it (a runtime override laid over a saved section) wins."""
    d = dict(d)
    if "dtype" in d:
        legacy = d.pop("dtype")
        d.setdefault("compute_dtype", legacy)
    return d


def canonical_dtype(value, field: str) -> str:
    """The canonical name of a floating dtype given as a string or a numpy/jnp dtype ("float32", "bfloat16").

    Raises ValueError naming `field` for anything else.
    """
    try:
        dt = jnp.dtype(value)  # knows bfloat16 by name, unlike numpy
    except (TypeError, ValueError) as e:
        raise ValueError(f"{field}={value!r} is not a dtype ({e}); use e.g. 'float32' or 'bfloat16'") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"{field}={value!r} is not a floating dtype; use e.g. 'float32' or 'bfloat16'")
    return dt.name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str = "glm4_moe"     # glm4_moe | llama | qwen2 | qwen3 (MODEL_TYPES)
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
    compute_dtype: str = "bfloat16"  # dtype of activations and matmuls (logits are returned in float32)
    param_dtype: str = "float32"     # storage dtype of parameters (the router stays float32)
    attention_impl: str = "reference"  # reference | blockwise | pallas | ring (see kernels/)
    moe_impl: str = "ragged"         # ragged (lax.ragged_dot) | dense (all experts; test reference) | megablox
    remat_policy: str = "none"       # none | full | save_dots | save_attention_inputs
    scan_layers: bool = True         # lax.scan over stacked layers (fast compiles) vs an unrolled loop
    moe_token_chunk: int = 0         # tokens per device dispatched at once in the MoE (0: all); bounds memory

    def __post_init__(self):
        # Frozen dataclass: normalise the dtype fields in place to their canonical names.
        object.__setattr__(self, "compute_dtype", canonical_dtype(self.compute_dtype, "compute_dtype"))
        object.__setattr__(self, "param_dtype", canonical_dtype(self.param_dtype, "param_dtype"))
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r}; choose one of {sorted(MODEL_TYPES)}")
        _, bias, qk_norm = MODEL_TYPES[self.model_type]
        if bias is not None:
            want = dict(first_k_dense_replace=self.num_hidden_layers, attention_bias=bias, use_qk_norm=qk_norm,
                        partial_rotary_factor=1.0)
            bad = {k: getattr(self, k) for k, v in want.items() if getattr(self, k) != v}
            if bad:
                raise ValueError(f"model_type={self.model_type!r} is a dense family that needs "
                                 + ", ".join(f"{k}={want[k]!r} (got {v!r})" for k, v in bad.items())
                                 + "; an MoE or partial-rotary model is model_type='glm4_moe'")
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
        return MODEL_TYPES[self.model_type][0]

    @property
    def is_dense_family(self) -> bool:
        """llama / qwen2 / qwen3: every layer dense, saved as that family's HF class."""
        return self.model_type != "glm4_moe"

    def arch_dict(self) -> dict:
        """The fields that decide the parameters and the function computed (ARCH_FIELDS; the dense MLP
        width where there are dense layers, the MoE fields where there are MoE layers)."""
        names = ARCH_FIELDS + (DENSE_ARCH_FIELDS if self.num_dense_layers else ()) + (
            MOE_ARCH_FIELDS if self.num_moe_layers else ())
        return {k: getattr(self, k) for k in names}

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf_dict(cls, d: dict, **runtime) -> "ModelConfig":
        """A config.json dict (glm4_moe, llama, qwen2 or qwen3) plus our runtime fields.

        Raises ValueError naming the field for what the model cannot compute (rope scaling, MLP or
        attention-output biases, sliding-window attention).
        """
        model_type = d.get("model_type") or "glm4_moe"
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r} is not supported; choose one of {sorted(MODEL_TYPES)}")
        dense = model_type != "glm4_moe"
        kw = {k: d[k] for k in (DENSE_HF_FIELDS if dense else HF_FIELDS) if k in d}
        if kw.get("head_dim") is None:
            kw["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        kw["rope_theta"], kw["partial_rotary_factor"] = _rope_of(d, default_theta=1e6 if not dense else 1e4,
                                                                 default_partial=0.5 if not dense else 1.0)
        if dense:
            _, bias, qk_norm = MODEL_TYPES[model_type]
            # Qwen2 has no attention_bias field: its q/k/v projections always carry a bias.
            if model_type != "qwen2" and d.get("attention_bias", False):
                raise ValueError(f"attention_bias={d['attention_bias']!r}: {model_type} with attention biases "
                                 "(on o_proj too) is not supported; it must be false")
            if d.get("mlp_bias", False):
                raise ValueError(f"mlp_bias={d['mlp_bias']!r}: MLP biases are not supported; it must be false")
            full = [t for t in d.get("layer_types") or () if t != "full_attention"]
            if full:
                raise ValueError(f"layer_types has {sorted(set(full))}: only full_attention layers are supported")
            if d.get("use_sliding_window", False):
                raise ValueError(f"use_sliding_window={d['use_sliding_window']!r}: sliding-window attention is "
                                 "not supported; it must be false")
            if kw["partial_rotary_factor"] != 1.0:
                raise ValueError(f"partial_rotary_factor={kw['partial_rotary_factor']}: {model_type} rotates "
                                 "the whole head; it must be 1.0")
            kw.update(model_type=model_type, attention_bias=bias, use_qk_norm=qk_norm,
                      first_k_dense_replace=d["num_hidden_layers"], num_nextn_predict_layers=0)
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = tuple(kw["eos_token_id"])
        return cls(**kw, **runtime)

    def to_hf_dict(self) -> dict:
        """config.json of the HF class `self.architecture` (transformers 5 layout: rope in rope_parameters)."""
        if self.is_dense_family:
            d = {k: getattr(self, k) for k in DENSE_HF_FIELDS}
            d.update(rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})
            if self.model_type == "llama":
                d.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
            else:
                d.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
                if self.model_type == "qwen3":
                    d.update(attention_bias=False)
        else:
            d = {k: getattr(self, k) for k in HF_FIELDS}
            d.update(rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta,
                                      "partial_rotary_factor": self.partial_rotary_factor})
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        d.update(model_type=self.model_type, architectures=[self.architecture], attention_dropout=0.0,
                 use_cache=True, dtype=self.param_dtype)
        return d


def _rope_of(d: dict, *, default_theta: float, default_partial: float) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) of a config.json: transformers 5 nests them in rope_parameters,
    4.x kept them at the top level beside `rope_scaling`. Only plain (default) RoPE is implemented."""
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters.rope_type={rope['rope_type']!r} is not supported (only 'default')")
    scaling = d.get("rope_scaling")
    if scaling is not None and (scaling.get("rope_type") or scaling.get("type") or "default") != "default":
        raise ValueError(f"rope_scaling={scaling!r} is not supported; only unscaled RoPE (null or 'default')")
    theta = float(rope.get("rope_theta", d.get("rope_theta", default_theta)))
    partial = float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", default_partial)))
    return theta, partial


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
    # SmolLM2-135M(-Instruct), as released: a Llama with tied embeddings (HF config.json and its GGUF agree).
    "smollm2_135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, first_k_dense_replace=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, attention_bias=False, use_qk_norm=False,
                         partial_rotary_factor=1.0, rope_theta=100000.0, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.02,
                         num_nextn_predict_layers=0, bos_token_id=1, eos_token_id=2, pad_token_id=2),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
