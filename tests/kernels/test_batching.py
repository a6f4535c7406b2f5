"""rowwise: vmapped calls reach the wrapped op once, with the batch flattened into rows."""

import jax
import jax.numpy as jnp
import numpy as np

from kernels import _batching

from ._jaxpr import find_eqns, in_shapes


def _op(fallback_calls=None):
    def fn(x, y, w):
        return (x * y) @ w, x

    def fallback(x, y, w):
        fallback_calls.append(x.shape)
        return (x * y) @ w, x

    return _batching.rowwise(fn, n_rows=2, fallback=fallback)


def _data(*shape):
    return jnp.asarray(np.random.default_rng(len(shape)).standard_normal(shape), jnp.float32)


def test_vmap_over_single_rows_runs_the_op_once_on_all_rows():
    op = _op()
    x, y, w = _data(7, 4), _data(7, 4), _data(4, 3)
    f = jax.vmap(lambda xi, yi: op(xi[None], yi[None], w))
    [eqn] = find_eqns(jax.make_jaxpr(f)(x, y), "custom_vmap_call")
    assert in_shapes(eqn) == [(7, 4), (7, 4), (4, 3)]
    out, same = f(x, y)
    np.testing.assert_allclose(
        out[:, 0], np.asarray(x * y, np.float64) @ np.asarray(w), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(same[:, 0], x)


def test_nested_vmap_flattens_every_level():
    op = _op()
    x, w = _data(2, 5, 3, 4), _data(4, 3)
    f = jax.vmap(jax.vmap(lambda xi: op(xi, xi, w)))
    [eqn] = find_eqns(jax.make_jaxpr(f)(x), "custom_vmap_call")
    assert in_shapes(eqn) == [(30, 4), (30, 4), (4, 3)]
    out, _ = f(x)
    np.testing.assert_allclose(
        out, np.asarray(x * x, np.float64) @ np.asarray(w), rtol=1e-5, atol=1e-5
    )


def test_unbatched_row_argument_is_broadcast():
    op = _op()
    x, y, w = _data(6, 2, 4), _data(2, 4), _data(4, 3)
    f = jax.vmap(lambda xi: op(xi, y, w))
    [eqn] = find_eqns(jax.make_jaxpr(f)(x), "custom_vmap_call")
    assert in_shapes(eqn) == [(12, 4), (12, 4), (4, 3)]
    out, _ = f(x)
    np.testing.assert_allclose(
        out, np.asarray(x * y, np.float64) @ np.asarray(w), rtol=1e-5, atol=1e-5
    )


def test_batched_weight_goes_through_the_fallback():
    calls = []
    op = _op(calls)
    x, w = _data(5, 2, 4), _data(5, 4, 3)
    out, _ = jax.vmap(lambda xi, wi: op(xi, xi, wi))(x, w)
    assert calls == [(2, 4)]  # traced once, per example, under the fallback's own vmap
    want = np.einsum("bmk,bkn->bmn", np.asarray(x * x, np.float64), np.asarray(w, np.float64))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
