"""Model FLOPs utilisation: FLOPs of the compiled step (XLA cost analysis) over the devices' peak.

Peak FLOP/s per chip from a table for TPUs and GPUs; on CPU it is measured by a matmul in this process.
"""
import time

import jax
import jax.numpy as jnp

PEAK_BF16_FLOPS = {  # per chip
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def measure_cpu_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of one device for an n x n fp32 matmul: the CPU 'peak' the MFU is measured against."""
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def device_peak_flops() -> float:
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_BF16_FLOPS.items():
        if kind.startswith(name):
            return flops
    return measure_cpu_peak_flops()


def compiled_flops(compiled) -> float | None:
    """Total FLOPs of one call of a compiled function, summed over devices when reported per device."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])
