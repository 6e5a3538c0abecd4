"""Process start-up shared by the entry points: emulated CPU devices and multi-host initialisation."""
import os

import jax


def setup_devices(cpu_devices: int = 0) -> None:
    """Call before any JAX operation.

    cpu_devices: emulated devices for the CPU backend (harmless on TPU/GPU, which ignore it).
    Multi-process: with KLONG_COORDINATOR / KLONG_NUM_PROCESSES / KLONG_PROCESS_ID set (as the tests and
    a manual multi-host launch do) jax.distributed is initialised with them; on TPU pods
    (several TPU_WORKER_HOSTNAMES) jax.distributed.initialize() discovers everything itself.
    """
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if jax.distributed.is_initialized():
        return
    if os.environ.get("KLONG_COORDINATOR"):
        jax.distributed.initialize(coordinator_address=os.environ["KLONG_COORDINATOR"],
                                   num_processes=int(os.environ["KLONG_NUM_PROCESSES"]),
                                   process_id=int(os.environ["KLONG_PROCESS_ID"]))
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()
