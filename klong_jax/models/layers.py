"""Building blocks: parameters with logical axes, RMSNorm, partial NeoX RoPE, the SwiGLU MLP.

Shape letters: see klong_jax/models/__init__.py.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from klong_jax.sharding import constrain


def dtype_of(name: str):
    return jnp.dtype(name)


def param(rngs: nnx.Rngs, shape, logical_axes, dtype, init="normal", std=0.02) -> nnx.Param:
    """An nnx.Param carrying its logical axis names (the sharding rules turn them into mesh axes)."""
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        raise ValueError(init)
    return nnx.Param(value, logical_axes=tuple(logical_axes))


class RouterBias(nnx.Variable):
    """`e_score_correction_bias`: chooses experts, never trained (optimizers take only nnx.Param)."""


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.weight = param(rngs, (dim,), ("norm",), param_dtype, init="ones")
        self.eps = eps

    def __call__(self, x):
        # Statistics in fp32 as the reference does, then back to the input dtype before the scale.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


def rope_cos_sin(positions_BT, rotary_dim: int, theta: float):
    """cos/sin [B, T, R] (R = rotary_dim) in fp32; frequencies duplicated (NeoX halves, not interleaved)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    freqs = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BTNH, cos_BTR, sin_BTR):
    """Rotate the first R of the H dims of each head (rotate_half style); the rest pass through.
    x_BTNH: queries [B, T, N, H] or keys [B, T, K, H]."""
    rot = cos_BTR.shape[-1]
    x_rot, x_pass = x_BTNH[..., :rot], x_BTNH[..., rot:]
    x1, x2 = jnp.split(x_rot.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
    out = x_rot.astype(jnp.float32) * cos + rotated * sin
    return jnp.concatenate([out.astype(x_BTNH.dtype), x_pass], axis=-1)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); the dense layers and the shared experts.
    gate_proj / up_proj [D, F], down_proj [F, D] (D = hidden, F = inter)."""

    def __init__(self, hidden: int, inter: int, *, dtype, param_dtype, std, rngs: nnx.Rngs):
        self.gate_proj = param(rngs, (hidden, inter), ("embed", "mlp"), param_dtype, std=std)
        self.up_proj = param(rngs, (hidden, inter), ("embed", "mlp"), param_dtype, std=std)
        self.down_proj = param(rngs, (inter, hidden), ("mlp", "embed"), param_dtype, std=std)
        self.dtype = dtype

    @jax.named_scope("mlp")
    def __call__(self, x_BTD):
        x = x_BTD.astype(self.dtype)
        gate_BTF = x @ self.gate_proj[...].astype(self.dtype)
        up_BTF = x @ self.up_proj[...].astype(self.dtype)
        h_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "seq", "act_heads"))
        return h_BTF @ self.down_proj[...].astype(self.dtype)
