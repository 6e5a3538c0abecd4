"""What a server serves: a model from an Orbax checkpoint, a Hugging Face directory, a GGUF file or a random
preset, and its tokenizer."""
from __future__ import annotations

import os

import jax

from klong_jax.data.tokenizer import Tokenizer, load_tokenizer
from klong_jax.sharding import make_mesh


def load_serving_model(*, checkpoint: str | None = None, hf_dir: str | None = None, gguf: str | None = None,
                       preset_name: str | None = None, mesh=None, seed: int = 0, **overrides):
    """Exactly one source. overrides: ModelConfig fields (runtime ones such as compute_dtype or attention_impl;
    for a preset also its shape, e.g. vocab_size). Without a mesh, one device."""
    given = [name for name, v in (("checkpoint", checkpoint), ("hf_dir", hf_dir), ("gguf", gguf),
                                  ("preset", preset_name)) if v]
    if len(given) != 1:
        raise ValueError(f"give exactly one of checkpoint, hf_dir, gguf, preset (got {given or 'none'})")
    if mesh is None:
        mesh = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    if checkpoint:
        from klong_jax.model_checkpoint import load_model
        return load_model(checkpoint, mesh, **overrides)
    if hf_dir:
        from klong_jax.hf import load_pretrained
        return load_pretrained(hf_dir, mesh=mesh, **overrides)
    if gguf:
        from klong_jax.hf.gguf import load_gguf
        from klong_jax.hf.pretrained import resolve_source
        return load_gguf(resolve_source(gguf), mesh=mesh, **overrides)
    from klong_jax.models import init_model, preset
    return init_model(preset(preset_name, **overrides), mesh, seed=seed)


def resolve_tokenizer(tokenizer: str | None, hf_dir: str | None = None, gguf: str | None = None) -> Tokenizer:
    """The given tokenizer file, else the HF directory's tokenizer.json, else the GGUF file's own tokenizer."""
    if tokenizer:
        return load_tokenizer(tokenizer)
    if gguf:
        from klong_jax.hf.pretrained import resolve_source
        return load_tokenizer(resolve_source(gguf))
    if hf_dir and os.path.exists(os.path.join(hf_dir, "tokenizer.json")):
        return load_tokenizer(hf_dir)
    raise ValueError("no tokenizer: pass --tokenizer (a SentencePiece .model, a tokenizer.json or a .gguf)"
                     + (f"; {hf_dir} has no tokenizer.json" if hf_dir else ""))
