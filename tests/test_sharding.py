"""Mesh construction from config and the logical-axis rules."""
import json
import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

from klong_jax.planning import abstract_mesh
from klong_jax.sharding import logical_to_spec, make_mesh, resolve_mesh_shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_shape_fills_minus_one_and_rejects_bad_shapes():
    assert resolve_mesh_shape({"fsdp": -1, "tensor": 2}, 8) == dict(data=1, fsdp=4, expert=1, context=1, tensor=2)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        resolve_mesh_shape({"model": 2}, 8)
    with pytest.raises(ValueError, match="at most one"):
        resolve_mesh_shape({"fsdp": -1, "data": -1}, 8)
    with pytest.raises(ValueError, match="needs 6 devices"):
        resolve_mesh_shape({"fsdp": 3, "tensor": 2}, 8)


def test_make_mesh_uses_all_devices(devices):
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    assert dict(mesh.shape) == dict(data=1, fsdp=2, expert=1, context=1, tensor=4)
    assert mesh.devices.size == len(devices)


def test_rules_map_logical_names_and_never_reuse_an_axis():
    mesh = abstract_mesh({"fsdp": 4, "expert": 2, "tensor": 2}, 16)
    # Expert weights: experts over `expert`, so `embed` only gets `fsdp`.
    assert logical_to_spec(("experts", "embed", "expert_mlp"), (8, 64, 32), mesh) == P("expert", "fsdp", "tensor")
    # Non-expert weights spread `embed` over fsdp and expert.
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 16), mesh) == P(("fsdp", "expert"), "tensor", None)
    # Activations: batch over data/fsdp/expert.
    assert logical_to_spec(("batch", "seq", "act_embed"), (16, 128, 64), mesh) == P(("fsdp", "expert"), None, None)


def test_rules_drop_axes_that_do_not_divide():
    mesh = abstract_mesh({"fsdp": 2, "tensor": 4}, 8)
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == P("fsdp", None, None)
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("nonsense",), (4,), mesh)


def test_plan_reports_glm45_air_sizes():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "plan.py"), "--config=configs/sft.py:glm45_air",
                          "--num_devices=256"], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    result = json.loads(out.stdout)
    assert abs(result["total_params"] / 1e9 - 106.85) < 0.01
    assert abs(result["active_params_per_token"] / 1e9 - 12.2) < 0.05
    per_device = result["bytes_per_device"]
    # fp32 params + two fp32 Adam moments = 12 bytes/param, spread over 256 chips (a little replication).
    ideal = 12 * result["total_params"] / 256
    assert ideal <= per_device["params_plus_optimizer"] < 1.1 * ideal
