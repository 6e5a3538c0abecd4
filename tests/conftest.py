"""Test set-up: an 8-device emulated CPU mesh, before jax initialises."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

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
