"""Hugging Face checkpoints (`Glm4MoeForCausalLM`, `LlamaForCausalLM`, `Qwen2/3ForCausalLM`) <-> our
sharded NNX model.

`load_from_reader` streams any tensor source (safetensors here, GGUF in `klong_jax.hf.gguf`) into the
model; `load_pretrained` = config.json + `SafetensorsReader` + `load_from_reader`. Loading streams tensor
by tensor straight into the sharded layout: each device shard is filled by a callback that reads only the
HF tensors it needs, so the whole model is never in host memory.
`save_pretrained` gathers one HF tensor at a time and writes sharded safetensors that transformers loads.
"""
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from klong_jax.hf.checkpoint import SafetensorsReader, SafetensorsWriter
from klong_jax.hf.mapping import is_mtp_key, tensor_maps
from klong_jax.models.config import ModelConfig, canonical_dtype, runtime_overrides
from klong_jax.models.init import model_layout

log = logging.getLogger(__name__)


def load_config(path: str, **runtime) -> ModelConfig:
    """ModelConfig of `path`/config.json with runtime fields (compute_dtype, param_dtype, attention_impl,
    ...) set; errors name the file and the field."""
    runtime = runtime_overrides("load_config", runtime)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        d = json.load(f)
    try:
        return ModelConfig.from_hf_dict(d, **runtime)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{cfg_path}: {e}") from e


def _check_keys(reader, maps, cfg: ModelConfig, source: str) -> None:
    """Every tensor the config implies is present with its HF shape, and nothing else (MTP layers skipped;
    with tied embeddings a stored `lm_head.weight` is accepted only when it equals the embedding)."""
    expected = {}
    for m in maps.values():
        for _, key in m.keys():
            expected[key] = m.hf_shape
    keys = set(reader.keys())
    if cfg.tie_word_embeddings and "lm_head.weight" in keys:
        _check_tied_head(reader, source)
        keys.discard("lm_head.weight")
    mtp = [k for k in keys if is_mtp_key(k, cfg)]
    if mtp:
        log.info("%s: skipping %d multi-token-prediction tensors (model.layers.%d.*)", source, len(mtp),
                 cfg.num_hidden_layers)
    unexpected = sorted(keys - set(expected) - set(mtp))
    if unexpected:
        raise ValueError(f"{source}: tensors not in a {cfg.architecture} of this config: {unexpected[:10]}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
    missing = sorted(set(expected) - keys)
    if missing:
        raise ValueError(f"{source}: missing tensors: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    for key, shape in expected.items():
        got = tuple(reader.shape(key))
        if got != shape:
            raise ValueError(f"{source}: tensor {key} has shape {got}, the config implies {shape}")


def _check_tied_head(reader, source: str) -> None:
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    if embed in reader.keys() and tuple(reader.shape(head)) == tuple(reader.shape(embed)) and np.array_equal(
            np.asarray(reader.get(head)), np.asarray(reader.get(embed))):
        log.info("%s: tie_word_embeddings=true; the stored lm_head.weight equals the embedding, not loaded", source)
        return
    raise ValueError(f"{source}: the config has tie_word_embeddings=true but the checkpoint stores an "
                     f"{head} that differs from {embed}; set tie_word_embeddings=false to load it as a "
                     "separate head")


def load_from_reader(reader, cfg: ModelConfig, *, mesh=None, rules=None, source: str):
    """Stream the tensors of `reader` into a (sharded) `Glm4MoeForCausalLM(cfg)`.

    reader: any tensor source with `.keys()` (HF tensor names), `.shape(key)` (the HF/torch shape, e.g.
    [out, in] for a Linear weight) and `.get(key) -> np.ndarray` in that HF layout (any float dtype; cast
    to the parameter dtype here). source names the checkpoint in errors. Keys and shapes are checked
    first (unknown, missing and mis-shaped tensors are named); then every variable is built with
    `jax.make_array_from_callback`, each device shard filled from only the HF tensors it covers
    (per layer, per expert), so the whole model is never in host memory. mesh=None: one device.
    """
    maps = tensor_maps(cfg)
    _check_keys(reader, maps, cfg, source)
    graphdef, abstract_state, shardings = model_layout(cfg, mesh, rules)

    flat_abstract = dict(nnx.to_flat_state(abstract_state))
    flat_shardings = dict(nnx.to_flat_state(shardings))
    if set(flat_abstract) != set(maps):
        raise RuntimeError(f"internal: mapping and model disagree: {set(flat_abstract) ^ set(maps)}")

    def load_one(path_, var):
        m = maps[path_]
        dtype_np = np.dtype(jnp.dtype(var.dtype))

        def fill(index):
            stack_idx, inner_idx = index[:m.n_stack], index[m.n_stack:]
            ranges = [range(*s.indices(n)) for s, n in zip(stack_idx, m.stack_shape)]
            out_shape = tuple(len(r) for r in ranges) + tuple(
                len(range(*s.indices(n))) for s, n in zip(inner_idx, m.inner_shape))
            out = np.empty(out_shape, dtype_np)
            for pos in np.ndindex(*[len(r) for r in ranges]):
                global_idx = tuple(r[p] for r, p in zip(ranges, pos))
                if m.n_stack == 0:
                    key = m.hf_key()
                elif m.n_stack == 1:
                    key = m.hf_key(global_idx[0] + m.layer_offset)
                else:
                    key = m.hf_key(global_idx[0] + m.layer_offset, global_idx[1])
                out[pos] = m.to_ours(np.asarray(reader.get(key)))[inner_idx].astype(dtype_np)
            return out

        value = jax.make_array_from_callback(var.shape, flat_shardings[path_], fill)
        return var.replace(value=value)

    flat_loaded = [(p, load_one(p, v)) for p, v in flat_abstract.items()]
    state = nnx.from_flat_state(flat_loaded)
    return nnx.merge(graphdef, state)


def load_pretrained(path: str, *, mesh=None, rules=None, param_dtype=None, compute_dtype=None, **runtime):
    """Load a HF checkpoint directory into a (sharded) model: config.json + SafetensorsReader +
    `load_from_reader`.

    param_dtype: parameter storage dtype (default float32, whatever the checkpoint stores); compute_dtype:
    activations and matmuls (default bfloat16); runtime: the other ModelConfig runtime fields
    (attention_impl, moe_impl, remat_policy, scan_layers, moe_token_chunk). `dtype=` raises TypeError.
    """
    runtime = runtime_overrides("load_pretrained", dict(runtime, param_dtype=param_dtype,
                                                         compute_dtype=compute_dtype))
    cfg = load_config(path, **runtime)
    return load_from_reader(SafetensorsReader(path), cfg, mesh=mesh, rules=rules, source=path)


def _host_value(x) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save_pretrained(model, path: str, *, save_dtype=None, max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json + safetensors that transformers' `{model.cfg.architecture}.from_pretrained` loads.

    save_dtype: dtype of the written tensors (a string or numpy/jnp dtype; default: the parameter dtype);
    the router and its bias stay float32.

    Gathers one HF tensor at a time (a slice of a stacked variable), so host memory stays bounded by the
    largest single tensor plus one shard. Every process must call this; process 0 writes.
    """
    cfg: ModelConfig = model.cfg
    maps = tensor_maps(cfg)
    _, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    writer = SafetensorsWriter(path, max_shard_bytes) if jax.process_index() == 0 else None
    save_dtype = None if save_dtype is None else canonical_dtype(save_dtype, "save_dtype")
    out_dtype = None if save_dtype is None else np.dtype(jnp.dtype(save_dtype))
    for p, m in maps.items():
        value = flat[p].get_value()
        for idx, key in m.keys():
            host = _host_value(value[idx] if idx else value)
            host = m.to_hf(host)
            if out_dtype is not None and p[-1] not in ("router", "router_bias"):
                host = host.astype(out_dtype)  # router stays fp32, as HF keeps it
            if writer is not None:
                writer.add(key, host)
    if writer is not None:
        writer.close()
        hf_cfg = cfg.to_hf_dict()
        if save_dtype is not None:
            hf_cfg["dtype"] = save_dtype
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)


__all__ = ["load_pretrained", "load_from_reader", "save_pretrained", "load_config"]
