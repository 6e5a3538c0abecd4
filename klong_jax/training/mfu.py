"""Model FLOPs utilisation: model FLOPs of the trained tokens over the devices' peak.

Model FLOPs are counted analytically (`train_flops_per_token`: 6 x active matmul parameters + causal attention),
as MaxText and PaLM do. The compiled step's XLA cost analysis (`compiled_flops`) is kept as a second figure, but
it is not a FLOP count one can rely on: XLA:GPU counts little of the blockwise attention's loops and of the MoE's
ragged matmuls (tiny model, 8 x 4096 tokens on an H200: 6.4e10 reported against 5.7e11 counted here).
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


def active_matmul_params(cfg) -> int:
    """Parameters one token multiplies through: attention and MLP projections of every layer (routed experts:
    only the num_experts_per_tok chosen, plus the shared ones and the router) and the output head. The embedding
    lookup is not a matmul and is left out."""
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attention = h * q + 2 * h * kv + q * h
    dense_mlp = 3 * h * cfg.intermediate_size
    moe_mlp = h * cfg.n_routed_experts + \
        3 * h * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    n_dense = min(cfg.first_k_dense_replace, cfg.num_hidden_layers)
    layers = cfg.num_hidden_layers * attention + n_dense * dense_mlp + (cfg.num_hidden_layers - n_dense) * moe_mlp
    return layers + h * cfg.vocab_size


def train_flops_per_token(cfg, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token: 6 per active matmul parameter, plus causal attention over a
    row of seq_len tokens (QK^T and PV, 4 * H * D FLOPs per attended position, seq_len / 2 positions on average,
    x3 for the backward pass)."""
    attention = 3 * 4 * cfg.num_attention_heads * cfg.head_dim * (seq_len / 2) * cfg.num_hidden_layers
    return 6.0 * active_matmul_params(cfg) + attention


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
