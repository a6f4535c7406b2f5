"""The fused epilogue-gradient kernel (interpret mode) vs float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import _backward

from ._reference import JAX_NN, UNMASKED_EDGES_OK, assert_close, factors


def _reference(g, t, b, bias, activation):
    """gz = g * act'(z) by float64 autodiff of jax.nn, and dt = gz @ bᵀ."""
    with jax.enable_x64(True):
        g, t, b = (jnp.asarray(np.asarray(v, np.float64)) for v in (g, t, b))
        z = t @ b + (0.0 if bias is None else jnp.asarray(np.asarray(bias, np.float64)))
        _, vjp = jax.vjp(JAX_NN[activation], z)
        (gz,) = vjp(g)
        return np.asarray(gz), np.asarray(gz @ b.T)


@pytest.mark.parametrize(
    "activation, bias, masked_ops",
    [
        ("gelu", True, True),
        ("silu", False, True),
        pytest.param("relu", True, False, marks=UNMASKED_EDGES_OK),
        (None, False, True),
    ],
)
def test_awkward_shape(activation, bias, masked_ops):
    x, a, b, c = factors(37, 129, 5, 70, bias=bias)
    t = x @ a
    g = jnp.asarray(np.random.default_rng(1).standard_normal((37, 70)), jnp.float32)
    run = jax.jit(
        lambda *args: _backward.fused_epilogue_grad(
            *args, activation=activation, masked_ops=masked_ops
        )
    )
    gz, dt = run(g, t, b, c)
    want_gz, want_dt = _reference(g, t, b, c, activation)
    assert_close(gz, want_gz, 1e-5)
    assert_close(dt, want_dt, 1e-5)
