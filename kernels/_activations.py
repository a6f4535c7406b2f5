"""Epilogue activations of the factored matmul and their derivatives.

Written with elementwise primitives only (exp, tanh, where) so the same code runs in
XLA and inside Pallas kernels (Triton, Mosaic, interpret). "gelu" is the tanh
approximation, equal to `jax.nn.gelu(z)` (approximate=True, its default).
"""

import math

import jax
import jax.numpy as jnp

NAMES = (None, "none", "relu", "gelu", "silu")

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def _sigmoid(z):
    return 1.0 / (1.0 + jnp.exp(-z))


def apply(name: str | None, z):
    """act(z) for an activation in `NAMES`."""
    if name in (None, "none"):
        return z
    if name == "relu":
        return jnp.maximum(z, 0.0)
    if name == "gelu":
        return 0.5 * z * (1.0 + jnp.tanh(_GELU_C * (z + _GELU_A * z * z * z)))
    if name == "silu":
        return z * _sigmoid(z)
    raise ValueError(f"activation must be one of {NAMES}, got {name!r}")


def derivative(name: str | None, z):
    """act'(z), the factor the backward pass multiplies the output cotangent by."""
    if name in (None, "none"):
        return jnp.ones_like(z)
    if name == "relu":
        return jnp.where(z > 0.0, 1.0, 0.0).astype(z.dtype)
    if name == "gelu":
        th = jnp.tanh(_GELU_C * (z + _GELU_A * z * z * z))
        return 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * _GELU_C * (
            1.0 + 3.0 * _GELU_A * z * z
        )
    if name == "silu":
        s = _sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    raise ValueError(f"activation must be one of {NAMES}, got {name!r}")


def jax_nn(name: str | None):
    """The `jax.nn` function the XLA path uses (same values; jax's own derivatives)."""
    if name in (None, "none"):
        return lambda z: z
    return {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu}[name]
