"""CoLA's inner activation act(σ(x @ a) @ b + bias): both impls vs a float64 numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import _backward, _forward

from ._jaxpr import find_eqns
from ._reference import assert_close, factors, np_reference


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize(
    "shape, inner, activation, bias",
    [
        ((37, 129, 5, 70), "silu", None, True),
        ((16, 64, 17, 33), "gelu", "relu", False),
        ((9, 33, 3, 48), "relu", "gelu", True),
    ],
)
def test_forward_and_gradients_match_float64_numpy(impl, shape, inner, activation, bias):
    m, k, r, n = shape
    x, a, b, c = factors(m, k, r, n, bias=bias)
    g = jnp.asarray(np.random.default_rng(1).standard_normal((m, n)), jnp.float32)

    @jax.jit
    def run(x, a, b, c, g):
        f = lambda x, a, b, c: kernels.factored_matmul(
            x, a, b, c, activation, impl, inner_activation=inner
        )
        y, vjp = jax.vjp(f, x, a, b, c)
        return y, vjp(g)

    y, grads = run(x, a, b, c, g)
    want_y, want_grads = np_reference(x, a, b, c, inner, activation, g)
    assert_close(y, want_y, 1e-5)
    for got, want in zip(grads, want_grads):
        assert (got is None) == (want is None)
        if want is not None:
            assert_close(got, want, 1e-5)


def test_pallas_path_runs_the_kernels_forward_and_backward():
    x, a, b, c = factors(8, 16, 4, 12)
    loss = lambda x, a: jnp.sum(
        kernels.factored_matmul(x, a, b, c, None, "pallas", inner_activation="silu")
    )
    names = {
        e.params["name"] for e in find_eqns(jax.make_jaxpr(jax.grad(loss))(x, a), "pallas_call")
    }
    assert names == {"factored_matmul_fwd", "factored_matmul_epilogue_grad"}


def test_kernels_save_the_pre_activation_intermediate():
    x, a, b, c = factors(37, 129, 5, 70)
    _, t = _forward.fused_forward(x, a, b, c, activation=None, inner_activation="gelu", save_t=True)
    assert_close(t, np.asarray(x, np.float64) @ np.asarray(a, np.float64), 1e-5)
    g = jnp.ones((37, 70), jnp.float32)
    gz, _ = _backward.fused_epilogue_grad(g, t, b, c, activation="silu", inner_activation="gelu")
    _, (_, _, _, want_dbias) = np_reference(x, a, b, c, "gelu", "silu", g)
    assert_close(gz.sum(0), want_dbias, 1e-5)


def test_bad_inner_activation_is_named():
    x, a, b, _ = factors(4, 6, 2, 5)
    with pytest.raises(ValueError, match=r"inner_activation must be one of .*'silu'\), got 'tanh'"):
        kernels.factored_matmul(x, a, b, inner_activation="tanh")
