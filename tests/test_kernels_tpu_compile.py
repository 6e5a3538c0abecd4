"""The Pallas kernels (forward and backward) and ring attention compile for real TPU topologies.

Compiled on this CPU machine through libtpu, inside shard_map, one subprocess per topology so libtpu
never loads into the test process (which runs with 8 emulated CPU devices).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PALLAS_BF16 = dict(impl="pallas", seq=1000, heads=8, kv_heads=2, head_dim=128, windows=True, backward=True)
CASES = {  # compile_for_topology keyword arguments, per topology
    "v5p:2x2x1": [PALLAS_BF16,
                  dict(impl="ring", seq=4096, heads=4, kv_heads=1, head_dim=128, windows=True, backward=True)],
    "v6e:2x2": [PALLAS_BF16,
                dict(impl="pallas", seq=640, heads=4, kv_heads=4, head_dim=64, windows=False, backward=True,
                     dtype="float32", block=256)],
}
SCRIPT = """
import json, sys
from kernels.tpu_aot import compile_for_topology
for case in json.loads(sys.argv[2]):
    print(json.dumps(compile_for_topology(sys.argv[1], **case)), flush=True)
"""


def _compile(topology):
    assert importlib.util.find_spec("libtpu"), "libtpu is missing: install the [tpu] extra (pyproject.toml)"
    # Compile-only libtpu users may overlap (another test, launch/plan.py): skip libtpu's process lock.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, topology, json.dumps(CASES[topology])], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"TPU compile for {topology} failed:\n{proc.stderr[-6000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.tpu_compile
@pytest.mark.parametrize("topology", sorted(CASES))
def test_kernels_compile_for_tpu(topology):
    results = _compile(topology)
    assert len(results) == len(CASES[topology])
    for case, got in zip(CASES[topology], results):
        # forward + dq + dkv kernels, per ring step for ring attention (its loop body and last step).
        expected = 3 if case["impl"] == "pallas" else 6
        assert got["mosaic_calls"] == expected, (case, got)
        if case["impl"] == "pallas":
            # The kernels' cost estimates reach cost_analysis: 4 + 6 + 8 matmul flops per causal pair.
            padded = -(-case["seq"] // 128) * 128
            assert got["flops"] >= 18 * 0.5 * case["heads"] * padded ** 2 * case["head_dim"], got
