"""Kernel-safe activations and derivatives vs float64 formulas and autodiff of jax.nn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import _activations

Z = np.linspace(-6.0, 6.0, 241)


def _gelu64(z):
    return 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3)))


REFERENCE = {
    None: lambda z: z,
    "none": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "gelu": _gelu64,
    "silu": lambda z: z / (1.0 + np.exp(-z)),
}


@pytest.mark.parametrize("name", _activations.NAMES)
def test_apply_matches_float64_formula(name):
    got = _activations.apply(name, jnp.asarray(Z, jnp.float32))
    np.testing.assert_allclose(got, REFERENCE[name](Z), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", _activations.NAMES)
def test_jax_nn_matches_float64_formula(name):
    got = _activations.jax_nn(name)(jnp.asarray(Z, jnp.float32))
    np.testing.assert_allclose(got, REFERENCE[name](Z), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", _activations.NAMES)
def test_derivative_matches_autodiff_of_jax_nn_in_float64(name):
    z = np.append(Z, 0.0)  # relu'(0) = 0, as jax.nn.relu
    with jax.enable_x64(True):
        want = jax.vmap(jax.grad(_activations.jax_nn(name)))(jnp.asarray(z, jnp.float64))
        got = _activations.derivative(name, jnp.asarray(z, jnp.float64))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="activation must be one of .* got 'tanh'"):
        _activations.apply("tanh", jnp.zeros(3))
    with pytest.raises(ValueError, match="activation must be one of .* got 'tanh'"):
        _activations.derivative("tanh", jnp.zeros(3))
