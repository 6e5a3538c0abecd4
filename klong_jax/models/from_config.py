"""ModelConfig from a config section (ml_collections ConfigDict or dict of ModelConfig fields)."""
import dataclasses

from klong_jax.models.config import ModelConfig


def model_config_from(section) -> ModelConfig:
    d = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    valid = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(d) - valid
    if unknown:
        raise ValueError(f"config.model has unknown fields {sorted(unknown)}; valid: {sorted(valid)}")
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = tuple(d["eos_token_id"])
    return ModelConfig(**d)
