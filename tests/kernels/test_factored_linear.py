"""factored_linear: factors in a Linear's layout (v (r, K), u (N, r)), vs float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels

from ._jaxpr import find_eqns
from ._reference import assert_close, factors, np_reference


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize(
    "shape, inner, activation, bias",
    [((21, 40, 6, 33), None, "relu", True), ((8, 17, 3, 12), "silu", "gelu", False)],
)
def test_vmapped_values_and_gradients_match_float64_numpy(impl, shape, inner, activation, bias):
    m, k, r, n = shape
    x, a, b, c = factors(m, k, r, n, bias=bias)
    v, u = a.T, b.T  # stored as a low-rank layer keeps them
    g = jnp.asarray(np.random.default_rng(2).standard_normal((m, n)), jnp.float32)

    def layer(x, v, u, c):  # one example at a time, vmapped, as LowRankLinear runs
        one = lambda row: kernels.factored_linear(
            row, v, u, c, activation, impl, inner_activation=inner
        )
        return jax.vmap(one)(x)

    y, vjp = jax.vjp(jax.jit(layer), x, v, u, c)
    dx, dv, du, dc = vjp(g)
    want_y, (want_dx, want_da, want_db, want_dc) = np_reference(x, a, b, c, inner, activation, g)
    assert_close(y, want_y, 1e-5)
    assert_close(dx, want_dx, 1e-5)
    assert_close(dv, want_da.T, 1e-5)
    assert_close(du, want_db.T, 1e-5)
    assert (dc is None) == (want_dc is None)
    if bias:
        assert_close(dc, want_dc, 1e-5)


def test_leading_batch_axes_match_float64_numpy():
    x, a, b, c = factors(12, 10, 4, 7)
    x = x.reshape(3, 4, 10)
    y = kernels.factored_linear(x, a.T, b.T, c, "silu", "xla")
    want, _ = np_reference(x.reshape(12, 10), a, b, c, None, "silu", np.zeros((12, 7)))
    assert_close(y.reshape(12, 7), want, 1e-5)


def test_xla_path_contracts_the_factors_as_stored():
    """No transpose of a factor reaches the program: XLA:CPU copies transposed operands
    on every call (inside a decode loop, every step)."""
    x, a, b, c = factors(5, 9, 3, 4)
    v, u = a.T, b.T
    one = lambda row, v, u: kernels.factored_linear(row, v, u, c, None, "xla")
    jaxpr = jax.make_jaxpr(jax.vmap(one, in_axes=(0, None, None)))(x, v, u)
    factor_vars = set(jaxpr.jaxpr.invars[1:])
    transposed = [e for e in find_eqns(jaxpr, "transpose") if set(e.invars) & factor_vars]
    assert not transposed
    assert len(find_eqns(jaxpr, "dot_general")) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"u": jnp.ones((4, 3))},
            r"takes v \(r, K\) and u \(N, r\), got v \(2, 5\) and u \(4, 3\)",
        ),
        ({"x": jnp.ones((3, 6))}, r"x must have shape \(\.\.\., K\) = \(\.\.\., 5\)"),
        ({"bias": jnp.ones(3)}, r"bias must have shape \(N,\) = \(4,\)"),
        ({"activation": "tanh"}, r"activation must be one of"),
        ({"inner_activation": "tanh"}, r"inner_activation must be one of"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    args = {"x": jnp.ones((3, 5)), "v": jnp.ones((2, 5)), "u": jnp.ones((4, 2))} | kwargs
    with pytest.raises(ValueError, match=message):
        kernels.factored_linear(**args)
