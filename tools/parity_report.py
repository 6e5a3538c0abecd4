"""Max |logit difference| of our model against the recorded transformers logits, per fixture case, on one
device and on 8-device meshes. JSON out.   .venv/bin/python tools/parity_report.py"""
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from klong_jax.runtime import setup_devices  # noqa: E402

setup_devices(8)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from klong_jax.hf import load_pretrained  # noqa: E402
from klong_jax.sharding import make_mesh  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
MESHES = {"1 device": None, "fsdp2 x tensor4": {"fsdp": 2, "tensor": 4}, "fsdp2 x expert4": {"fsdp": 2, "expert": 4}}
report = {}
for case in sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf", "*", ""))):
    ids, ref = np.load(case + "inputs.npy"), np.load(case + "logits.npy")
    row = {}
    for name, shape in MESHES.items():
        mesh = make_mesh(shape) if shape else None
        model = load_pretrained(case, compute_dtype="float32", mesh=mesh)
        gd, st = nnx.split(model)
        if mesh is None:
            out = model(ids)
        else:
            with jax.set_mesh(mesh):
                out = jax.jit(lambda s, x: nnx.merge(gd, s)(x))(st, ids)
        row[name] = float(np.abs(np.asarray(out) - ref).max())
    report[os.path.basename(os.path.dirname(case))] = row
print(json.dumps(report, indent=2))
