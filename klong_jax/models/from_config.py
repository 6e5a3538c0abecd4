"""ModelConfig (and UpcycleConfig) from a config section (ml_collections ConfigDict or dict of fields).

The section's keys are ModelConfig fields describing the FINAL architecture; an optional `upcycle`
sub-section (UpcycleConfig fields) says how that architecture is reached from a dense checkpoint.
"""
import dataclasses

from klong_jax.models.config import ModelConfig, upgrade_legacy_fields
from klong_jax.models.upcycle import UpcycleConfig


def _as_dict(section) -> dict:
    return dict(section.to_dict() if hasattr(section, "to_dict") else section)


def model_config_from(section) -> ModelConfig:
    """The ModelConfig of a config.model section (its `upcycle` sub-section ignored).

    Run configs saved before the compute dtype was renamed hold it as "dtype"; it is read as compute_dtype
    unless a compute_dtype is given too (launch/eval.py lays the current runtime fields over a saved section).
    """
    d = upgrade_legacy_fields(_as_dict(section))
    d.pop("upcycle", None)
    valid = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(d) - valid
    if unknown:
        raise ValueError(f"config.model has unknown fields {sorted(unknown)}; valid: {sorted(valid)}")
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = tuple(d["eos_token_id"])
    return ModelConfig(**d)


def upcycle_config_from(section) -> UpcycleConfig:
    """The UpcycleConfig of config.model.upcycle; no such sub-section (or an empty one) means off."""
    d = _as_dict(section)
    up = d.get("upcycle")
    if not up:
        return UpcycleConfig()
    up = _as_dict(up)
    valid = {f.name for f in dataclasses.fields(UpcycleConfig)}
    unknown = set(up) - valid
    if unknown:
        raise ValueError(f"config.model.upcycle has unknown fields {sorted(unknown)}; valid: {sorted(valid)}")
    return UpcycleConfig(**up)
