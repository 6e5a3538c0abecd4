"""Process start-up shared by the entry points: emulated CPU devices and multi-host initialisation."""
import os

import jax


def setup_devices(cpu_devices: int = 0, distributed: bool | None = None) -> None:
    """Call before any JAX operation.

    cpu_devices: emulated devices for the CPU backend (harmless on TPU/GPU, which ignore it).
    distributed: call jax.distributed.initialize(); default: when a coordinator is configured in the
    environment (TPU pods and the tests' JAX_COORDINATOR_ADDRESS set it).
    """
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if distributed is None:
        distributed = bool(os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("TPU_WORKER_HOSTNAMES")
                           and "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))
    if distributed and not jax.distributed.is_initialized():
        jax.distributed.initialize()
