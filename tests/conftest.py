"""Test set-up: an 8-device emulated CPU mesh, before jax initialises."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# Grain worker processes and library code read absl flags; outside app.run they must be marked parsed.
flags.FLAGS.mark_as_parsed()
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def devices():
  assert len(jax.devices()) == 8, "tests expect 8 emulated CPU devices"
  return jax.devices()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def smol_server(tmp_path_factory):
    """URL (up to /v1) of launch/serve.py serving SmolLM2-135M-Instruct as model "smol", one server for the
    whole session (about 40 s to start on 2 busy cores); skipped when the GGUF is not cached (make pretrained)."""
    from klong_jax.hf.pretrained import local_path
    if not os.path.isfile(local_path("smollm2-135m-instruct")):
        pytest.skip("SmolLM2 GGUF not cached (make pretrained)")
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "launch", "serve.py"), "--gguf=pretrained:smollm2-135m-instruct",
         f"--port={port}", "--cpu_devices=1", "--model_name=smol", "--max_batch=2"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,   # conftest's 8-device XLA_FLAGS are not the server's
        env={**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"launch/serve.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"launch/serve.py did not answer in 240 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1.0)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
