"""GGUF (llama.cpp) llama checkpoints -> HF-named, HF-layout float32 tensors -> our sharded model.

    model = load_gguf(path, mesh=mesh, compute_dtype="float32")            # config + weights
    reader = GGUFTensorReader(path); reader.hf_config; reader.get("model.layers.0.self_attn.q_proj.weight")

The container is read with the `gguf` package (`gguf.GGUFReader`: metadata fields and memory-mapped tensor
bytes); the dequantization is ours (`dequantize`, formulas below) and is checked in the tests against
`gguf.quants.dequantize` and hand-computed blocks.

Layout. GGUF lists a tensor's dims fastest-varying first: a torch Linear weight [out, in] is stored as
ne = [in, out], row-major over `out` rows of `in` values. Rows are what quantization blocks run along, so
reading the bytes as (out, in) row-major is exactly HF's [out, in]; no transpose is needed.

Q/K rows. llama.cpp's llama rotary rotates adjacent pairs (2i, 2i+1) of a head, HF's (and ours) rotates
the two halves (i, i + H/2). Its converter therefore reorders the rows of q_proj (per q head, n = N heads)
and k_proj (per kv head, n = K heads) so that the pair a rotate-half model forms becomes adjacent:
HF row h*H + s*H/2 + i (head h, half s, index i < H/2) is stored at GGUF row h*H + 2i + s. `unpermute_rows`
inverts that: viewed as [n, H/2, 2, in], GGUF rows are HF rows viewed as [n, 2, H/2, in] with the middle
axes swapped, so swapping them back restores HF order.

Names: token_embd -> model.embed_tokens, output_norm -> model.norm, output -> lm_head (absent: tied),
blk.{i}.attn_{norm,q,k,v,output} -> model.layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj},
blk.{i}.ffn_{norm,gate,up,down} -> model.layers.{i}.{post_attention_layernorm, mlp.{gate,up,down}_proj}.
"""
from __future__ import annotations

import logging
import os
import re
import time
from collections import OrderedDict

import numpy as np

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Dequantization. Every block-quantized type stores a tensor row by row, each row a run of blocks of
# `block` values packed in `nbytes` bytes. Little-endian fields; f16 = IEEE half.

QK_K = 256


def _f16(blocks_NB: np.ndarray, start: int) -> np.ndarray:
    """The little-endian float16 at byte `start` of every block, as float32 [N, 1]."""
    return np.ascontiguousarray(blocks_NB[:, start:start + 2]).view("<f2").astype(np.float32)


def _nibbles(qs_NQ: np.ndarray) -> np.ndarray:
    """[N, Q] bytes -> [N, 2Q] values: the Q low nibbles, then the Q high nibbles (ggml's 32-block order)."""
    return np.concatenate([qs_NQ & 0x0F, qs_NQ >> 4], axis=-1)


def _q8_0(b):
    """34 bytes: d (f16), 32 x int8 q.  x = d * q."""
    return _f16(b, 0) * b[:, 2:34].view(np.int8).astype(np.float32)


def _q4_0(b):
    """18 bytes: d, 16 bytes of nibbles (value j < 16: low nibble of byte j; j >= 16: high nibble of
    byte j - 16).  x = d * (q - 8)."""
    return _f16(b, 0) * (_nibbles(b[:, 2:18]).astype(np.float32) - 8)


def _q4_1(b):
    """20 bytes: d, m (f16), 16 bytes of nibbles as Q4_0.  x = d * q + m."""
    return _f16(b, 0) * _nibbles(b[:, 4:20]).astype(np.float32) + _f16(b, 2)


def _high_bits_32(qh_N4: np.ndarray) -> np.ndarray:
    """4 bytes read as a little-endian uint32; bit j is the 5th bit (value 16) of value j. -> [N, 32]."""
    qh = np.ascontiguousarray(qh_N4).view("<u4")                              # [N, 1]
    return ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4


def _q5_0(b):
    """22 bytes: d, qh (4 bytes), 16 bytes of nibbles.  q = nibble | (bit j of qh) << 4;  x = d * (q - 16)."""
    q = _nibbles(b[:, 6:22]) | _high_bits_32(b[:, 2:6])
    return _f16(b, 0) * (q.astype(np.float32) - 16)


def _q5_1(b):
    """24 bytes: d, m, qh (4 bytes), 16 bytes of nibbles.  q as Q5_0;  x = d * q + m."""
    q = _nibbles(b[:, 8:24]) | _high_bits_32(b[:, 4:8])
    return _f16(b, 0) * q.astype(np.float32) + _f16(b, 2)


def _k_scales_mins(s_N12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins ([N, 8] each) of Q4_K / Q5_K.

    j < 4:  scale = s[j] & 63,  min = s[j+4] & 63;
    j >= 4: scale = (s[j+4] & 15) | (s[j-4] >> 6) << 4,  min = (s[j+4] >> 4) | (s[j] >> 6) << 4.
    """
    s = s_N12.astype(np.uint8)
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=-1)
    mins = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_nibbles(qs_N128: np.ndarray) -> np.ndarray:
    """128 bytes -> [N, 8, 32] 4-bit values: 4 chunks of 32 bytes; chunk c's low nibbles are sub-block 2c,
    its high nibbles sub-block 2c + 1."""
    q = qs_N128.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 0x0F, q >> 4], axis=2).reshape(-1, 8, 32)


def _q4_k(b):
    """144 bytes per 256 values: d, dmin (f16), 12 bytes of scales/mins, 128 bytes of nibbles; 8 sub-blocks
    of 32.  x = d * scale_j * q - dmin * min_j."""
    d, dmin = _f16(b, 0)[:, :, None], _f16(b, 2)[:, :, None]
    sc, mn = _k_scales_mins(b[:, 4:16])
    q = _k_nibbles(b[:, 16:144]).astype(np.float32)
    return (d * sc[:, :, None] * q - dmin * mn[:, :, None]).reshape(-1, QK_K)


def _q5_k(b):
    """176 bytes per 256 values: d, dmin, 12 bytes of scales/mins, qh (32 bytes), 128 bytes of nibbles.
    q = nibble | (bit j of qh[l]) << 4 for value l of sub-block j.  x = d * scale_j * q - dmin * min_j."""
    d, dmin = _f16(b, 0)[:, :, None], _f16(b, 2)[:, :, None]
    sc, mn = _k_scales_mins(b[:, 4:16])
    qh = b[:, 16:48]                                                           # [N, 32]
    high = ((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4   # [N, 8, 32]
    q = (_k_nibbles(b[:, 48:176]) | high).astype(np.float32)
    return (d * sc[:, :, None] * q - dmin * mn[:, :, None]).reshape(-1, QK_K)


def _q6_k(b):
    """210 bytes per 256 values: ql (128 bytes, low 4 bits), qh (64 bytes, high 2 bits), 16 int8 scales,
    d (f16). Two halves of 128 values; in half h, value 32g + l (group g < 4, l < 32) has
    low = (ql[64h + 32(g % 2) + l] >> 4(g // 2)) & 15, high = (qh[32h + l] >> 2g) & 3,
    q = (low | high << 4) - 32, and scale = scales[(128h + 32g + l) // 16].  x = d * scale * q."""
    ql = b[:, 0:128].reshape(-1, 2, 1, 2, 32)                                  # [N, half, -, g%2, l]
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(-1, 2, 4, 32)   # g = 2 * (g//2) + g%2
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3  # [N, 2, 4, 32]
    q = ((low | (high << 4)).astype(np.float32) - 32).reshape(-1, 16, 16)
    scales = b[:, 192:208].view(np.int8).astype(np.float32)                    # [N, 16]
    return (_f16(b, 208)[:, :, None] * scales[:, :, None] * q).reshape(-1, QK_K)


# name -> (values per block, bytes per block, block decoder [N, bytes] uint8 -> [N, values] float32)
_BLOCK_TYPES = {
    "Q8_0": (32, 34, _q8_0), "Q4_0": (32, 18, _q4_0), "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0), "Q5_1": (32, 24, _q5_1),
    "Q4_K": (QK_K, 144, _q4_k), "Q5_K": (QK_K, 176, _q5_k), "Q6_K": (QK_K, 210, _q6_k),
}
SUPPORTED_TYPES = ("F32", "F16", "BF16") + tuple(_BLOCK_TYPES)


def dequantize(data: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decodes one tensor to float32 of `shape` (numpy order: slowest first, rows last).

    data: the tensor's bytes as GGUFReader exposes them (a float16/float32 array for F16/F32, uint8
    otherwise), any shape; qtype: the GGML type name. BF16: the upper 16 bits of a float32.
    """
    n = int(np.prod(shape))
    if qtype == "F32":
        out = np.asarray(data, np.float32).reshape(-1)
    elif qtype == "F16":
        out = np.ascontiguousarray(data).reshape(-1).view("<f2").astype(np.float32)
    elif qtype == "BF16":
        out = (np.ascontiguousarray(data).reshape(-1).view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif qtype in _BLOCK_TYPES:
        block, nbytes, decode = _BLOCK_TYPES[qtype]
        if shape[-1] % block:
            raise ValueError(f"{qtype} rows of {shape[-1]} values are not a whole number of {block}-blocks")
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if raw.size != n // block * nbytes:
            raise ValueError(f"{qtype} tensor of shape {shape} needs {n // block * nbytes} bytes, has {raw.size}")
        out = decode(raw.reshape(-1, nbytes)).reshape(-1)
    else:
        raise NotImplementedError(f"GGML type {qtype} is not dequantized here (supported: {SUPPORTED_TYPES})")
    if out.size != n:
        raise ValueError(f"{qtype} tensor of shape {shape} has {out.size} values")
    return out.reshape(shape)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's interleaved-rotary row order of q_proj/k_proj -> HF's rotate-half order (module doc).

    w: [n_heads * H, ...] as stored in the GGUF; returns the same rows in HF order. For head h, half s and
    i < H/2: out[h*H + s*H/2 + i] = w[h*H + 2i + s].
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of an even head dim")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------------------
# Names and metadata

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def hf_name(gguf_name: str) -> str | None:
    """The HF LlamaForCausalLM tensor name of a GGUF llama tensor, or None when there is none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


class _Fields:
    """Typed access to GGUF metadata, with errors that name the file and the key."""

    def __init__(self, reader, path: str):
        self.reader, self.path = reader, path

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default=None, *, required: bool = False):
        field = self.reader.fields.get(key)
        if field is None:
            if required:
                raise ValueError(f"{self.path}: GGUF metadata key {key!r} is missing (needed for the model config)")
            return default
        return field.contents()

    def array_len(self, key: str) -> int | None:
        field = self.reader.fields.get(key)
        return None if field is None else len(field.data)


def hf_config_from_fields(fields: _Fields, tensor_shapes: dict[str, tuple[int, ...]]) -> dict:
    """GGUF llama metadata -> a HF LlamaConfig-style dict (config.json field names).

    tensor_shapes: GGUF name -> numpy-order shape (for tied embeddings and the vocab size fallback).
    """
    path = fields.path
    arch = fields.get("general.architecture", required=True)
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture={arch!r}; only 'llama' GGUF files are supported "
                         f"(convert other architectures to HF safetensors and use load_pretrained)")
    a = "llama."
    if fields.get(a + "expert_count", 0):
        raise ValueError(f"{path}: {a}expert_count={fields.get(a + 'expert_count')}: mixture-of-experts "
                         f"llama GGUF files are not supported")
    scaling = fields.get(a + "rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise ValueError(f"{path}: {a}rope.scaling.type={scaling!r}: only unscaled rotary is supported")
    if "rope_freqs.weight" in tensor_shapes:
        raise ValueError(f"{path}: has rope_freqs.weight (llama-3 rotary frequency factors): not supported")
    D = int(fields.get(a + "embedding_length", required=True))
    N = int(fields.get(a + "attention.head_count", required=True))
    K = int(fields.get(a + "attention.head_count_kv", N))
    H = int(fields.get(a + "attention.key_length", D // N))
    if int(fields.get(a + "attention.value_length", H)) != H:
        raise ValueError(f"{path}: {a}attention.value_length={fields.get(a + 'attention.value_length')} differs "
                         f"from key_length={H}: not supported")
    rope_dim = int(fields.get(a + "rope.dimension_count", H))
    if rope_dim != H:
        raise ValueError(f"{path}: {a}rope.dimension_count={rope_dim} != head dim {H}: partial rotary llama "
                         f"GGUF files are not supported")
    vocab = fields.get(a + "vocab_size")
    if vocab is None:
        vocab = fields.array_len("tokenizer.ggml.tokens")
    if vocab is None and "token_embd.weight" in tensor_shapes:
        vocab = tensor_shapes["token_embd.weight"][0]
    if vocab is None:
        raise ValueError(f"{path}: no vocab size: neither {a}vocab_size, tokenizer.ggml.tokens nor token_embd.weight")
    eps = float(fields.get(a + "attention.layer_norm_rms_epsilon", required=True))
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": D,
        "intermediate_size": int(fields.get(a + "feed_forward_length", required=True)),
        "num_hidden_layers": int(fields.get(a + "block_count", required=True)),
        "num_attention_heads": N,
        "num_key_value_heads": K,
        "head_dim": H,
        "max_position_embeddings": int(fields.get(a + "context_length", required=True)),
        # GGUF stores float32: 1e-5 reads back as 9.999999747378752e-06; round to float32's precision.
        "rms_norm_eps": float(f"{eps:.7g}"),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(fields.get(a + "rope.freq_base", 10000.0))},
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": _opt_int(fields.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _opt_int(fields.get("tokenizer.ggml.eos_token_id")),
        "pad_token_id": _opt_int(fields.get("tokenizer.ggml.padding_token_id")),
    }


def _opt_int(v):
    return None if v is None else int(v)


def expected_hf_shapes(hf_cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a HF LlamaForCausalLM of this config and its torch shape ([out, in] for Linear): the
    keys and shapes `klong_jax.hf.mapping.tensor_maps` loads, so the reader and the loader agree by
    construction."""
    from klong_jax.hf.mapping import tensor_maps
    from klong_jax.models.config import ModelConfig
    cfg = ModelConfig.from_hf_dict(hf_cfg)
    return {key: m.hf_shape for m in tensor_maps(cfg).values() for _, key in m.keys()}


# ---------------------------------------------------------------------------------------------------------
# The reader


class GGUFTensorReader:
    """HF-named, HF-layout float32 tensors of a llama GGUF file, dequantized one at a time on demand.

    keys(): HF LlamaForCausalLM tensor names; shape(key): the torch shape; get(key) -> float32 [out, in]
    (Q/K rows un-permuted). hf_config: the LlamaConfig-style dict of the metadata. A byte-bounded LRU cache
    (`cache_bytes`) keeps recent dequantized tensors, so filling several device shards of one stacked
    variable dequantizes each tensor once; the whole model is never dequantized at once.
    On construction: architecture and metadata are checked, every tensor must have an HF name, a supported
    type and the shape the metadata implies, and every expected tensor must be present (ValueError naming
    the tensor and the file otherwise).
    """

    def __init__(self, path: str, *, cache_bytes: int = 256 << 20):
        import gguf
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such GGUF file (python launch/fetch.py fetches the "
                                    f"registered pretrained bases)")
        try:
            self._reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError) as e:
            raise ValueError(f"{self.path}: not a readable GGUF file: {e}") from e
        if self._reader.byte_order != "I":
            raise ValueError(f"{self.path}: a byte-swapped (big-endian) GGUF file: not supported")
        self.fields = _Fields(self._reader, self.path)
        gguf_shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in self._reader.tensors}
        self.hf_config = hf_config_from_fields(self.fields, gguf_shapes)
        try:
            expected = expected_hf_shapes(self.hf_config)
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{self.path}: {e}") from e
        self._tensors = {}
        for t in self._reader.tensors:
            key = hf_name(t.name)
            if key is None or key not in expected:
                raise ValueError(f"{self.path}: tensor {t.name!r} ({t.tensor_type.name}) is not part of a "
                                 f"LlamaForCausalLM with this metadata (block_count="
                                 f"{self.hf_config['num_hidden_layers']})")
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise ValueError(f"{self.path}: tensor {t.name!r} is {t.tensor_type.name}, which is not "
                                 f"dequantized here (supported: {', '.join(SUPPORTED_TYPES)}); re-quantize the "
                                 f"file to one of them with llama.cpp's llama-quantize")
            if gguf_shapes[t.name] != expected[key]:
                raise ValueError(f"{self.path}: tensor {t.name!r} ({key}) has shape {gguf_shapes[t.name]} "
                                 f"([out, in]), the metadata implies {expected[key]}")
            self._tensors[key] = t
        missing = [k for k in expected if k not in self._tensors]
        if missing:
            raise ValueError(f"{self.path}: missing tensors (HF names): {missing[:10]}"
                             f"{' ...' if len(missing) > 10 else ''}")
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_bytes, self._cached = cache_bytes, 0
        self.dequantized = 0   # tensors decoded so far (cache misses)

    def keys(self):
        return self._tensors.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[key].shape.tolist()))

    def gguf_name(self, key: str) -> str:
        return self._tensors[key].name

    def quant_type(self, key: str) -> str:
        return self._tensors[key].tensor_type.name

    def get(self, key: str) -> np.ndarray:
        """float32, HF layout; the returned array is shared with the cache: do not modify it."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        t = self._tensors[key]
        w = dequantize(t.data, t.tensor_type.name, self.shape(key))
        if key.endswith("self_attn.q_proj.weight"):
            w = unpermute_rows(w, self.hf_config["num_attention_heads"])
        elif key.endswith("self_attn.k_proj.weight"):
            w = unpermute_rows(w, self.hf_config["num_key_value_heads"])
        w = np.ascontiguousarray(w)
        w.flags.writeable = False
        self.dequantized += 1
        if w.nbytes <= self._cache_bytes:
            self._cache[key] = w
            self._cached += w.nbytes
            while self._cached > self._cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= old.nbytes
        return w

    def metadata(self) -> dict:
        """Scalar and string metadata fields (arrays such as the token list are left out)."""
        import gguf
        return {k: f.contents() for k, f in self._reader.fields.items()
                if f.types and f.types[0] != gguf.GGUFValueType.ARRAY}


def gguf_config(path_or_reader, *, param_dtype=None, compute_dtype=None, **runtime):
    """The ModelConfig of a llama GGUF file: `ModelConfig.from_hf_dict(reader.hf_config, **runtime)`.

    param_dtype: parameter storage (default float32); compute_dtype: activations and matmuls (default
    bfloat16); runtime: the other ModelConfig runtime fields (`dtype=` and unknown names: TypeError).
    """
    from klong_jax.models.config import ModelConfig, runtime_overrides
    runtime = runtime_overrides("load_gguf", dict(runtime, param_dtype=param_dtype, compute_dtype=compute_dtype))
    reader = path_or_reader if isinstance(path_or_reader, GGUFTensorReader) else GGUFTensorReader(path_or_reader)
    try:
        return ModelConfig.from_hf_dict(reader.hf_config, **runtime)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{reader.path}: {e}") from e


def load_gguf(path: str, *, mesh=None, rules=None, param_dtype=None, compute_dtype=None, **runtime):
    """Loads a llama GGUF file into a (sharded) model: config from the metadata (`gguf_config`), weights
    streamed through `klong_jax.hf.load_from_reader` (each device shard filled from the dequantized HF
    tensors it covers; each tensor dequantized once, see GGUFTensorReader).

    param_dtype / compute_dtype / runtime: ModelConfig runtime fields (compute_dtype, param_dtype,
    attention_impl, moe_impl, remat_policy, scan_layers, moe_token_chunk). mesh=None: one device.
    """
    from klong_jax.hf import load_from_reader
    t0 = time.time()
    reader = GGUFTensorReader(path)
    cfg = gguf_config(reader, param_dtype=param_dtype, compute_dtype=compute_dtype, **runtime)
    model = load_from_reader(reader, cfg, mesh=mesh, rules=rules, source=reader.path)
    log.info("loaded %s (%d tensors dequantized) in %.1fs", path, reader.dequantized, time.time() - t0)
    return model


__all__ = ["GGUFTensorReader", "load_gguf", "gguf_config", "dequantize", "unpermute_rows", "hf_name",
           "hf_config_from_fields", "expected_hf_shapes", "SUPPORTED_TYPES"]
