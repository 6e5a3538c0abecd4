"""Dataclass configs built from dicts or ml_collections ConfigDicts: one check for unknown keys."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping


def known_items(config: Mapping, cls, section: str, *, exclude: tuple[str, ...] = ()) -> dict:
    """config's items as a dict, after checking every key is a field of dataclass `cls` (minus `exclude`);
    an unknown key is a ValueError naming the section and listing the known keys (typos fail loudly)."""
    items = dict(config.items())
    names = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    unknown = sorted(set(items) - names)
    if unknown:
        raise ValueError(f"unknown {section} config key(s) {unknown}; known: {sorted(names)}")
    return items
