"""LowRankLinear / LowRankConv against float64 numpy references, under JAX transforms."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lowrank

from ._models import with_exact_rank


def _np_conv(x, w, stride, padding, dilation):
    """Direct float64 cross-correlation: x (C, *S), w (O, C, *K), explicit (lo, hi) padding."""
    x = np.pad(x, [(0, 0)] + list(padding))
    k = w.shape[2:]
    eff = [d * (kk - 1) + 1 for kk, d in zip(k, dilation)]
    out_sp = [(x.shape[1 + i] - eff[i]) // stride[i] + 1 for i in range(len(k))]
    out = np.zeros((w.shape[0], *out_sp))
    for idx in np.ndindex(*out_sp):
        sl = tuple(
            slice(idx[i] * stride[i], idx[i] * stride[i] + eff[i], dilation[i])
            for i in range(len(k))
        )
        patch = x[(slice(None),) + sl]
        out[(slice(None),) + idx] = np.tensordot(w, patch, axes=len(k) + 1)
    return out


@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    r=st.integers(1, 6),
    bias=st.booleans(),
    seed=st.integers(0, 99),
)
def test_lowrank_linear_matches_float64_reference(m, n, r, bias, seed):
    rng = np.random.default_rng(seed)
    u, v, x = rng.normal(size=(m, r)), rng.normal(size=(r, n)), rng.normal(size=n)
    b = rng.normal(size=m) if bias else None
    layer = lowrank.LowRankLinear(
        jnp.asarray(u, jnp.float32),
        jnp.asarray(v, jnp.float32),
        None if b is None else jnp.asarray(b, jnp.float32),
    )
    want = u @ (v @ x) + (0 if b is None else b)
    got = np.asarray(layer(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize(
    "spatial,stride,padding,dilation",
    [
        (1, (2,), ((1, 2),), (1,)),
        (2, (1, 2), ((1, 1), (0, 2)), (2, 1)),
        (3, (1, 1, 2), ((1, 1),) * 3, (1, 1, 1)),
    ],
)
def test_lowrank_conv_matches_float64_reference(spatial, stride, padding, dilation):
    rng = np.random.default_rng(spatial)
    c_in, c_out, r = 3, 5, 2
    kernel = (3,) * spatial
    u, v = rng.normal(size=(c_out, r)), rng.normal(size=(r, c_in, *kernel))
    b = rng.normal(size=c_out)
    x = rng.normal(size=(c_in,) + (7,) * spatial)
    want = _np_conv(x, np.tensordot(u, v, axes=1), stride, padding, dilation) + b.reshape(
        (-1,) + (1,) * spatial
    )
    for lowering in ("einsum", "conv"):
        layer = lowrank.LowRankConv(
            *(jnp.asarray(a, jnp.float32) for a in (u, v, b)),
            stride=stride,
            padding=padding,
            dilation=dilation,
            lowering=lowering,
        )
        got = np.asarray(layer(jnp.asarray(x, jnp.float32)))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("mode", ["REFLECT", "REPLICATE", "CIRCULAR"])
def test_lowrank_conv_padding_modes_match_equinox(mode):
    key = jax.random.key(1)
    conv = with_exact_rank(
        eqx.nn.Conv2d(2, 4, 3, stride=2, padding="SAME", padding_mode=mode, key=key), 2, key=key
    )
    low = lowrank.factorize(conv, rank=2)
    assert isinstance(low, lowrank.LowRankConv) and low.padding_mode == mode
    x = jax.random.normal(key, (2, 7, 7))
    np.testing.assert_allclose(low(x), conv(x), rtol=1e-5, atol=1e-5)


def test_lowrank_conv_normalizes_arguments_like_equinox():
    conv = lowrank.LowRankConv(
        jnp.ones((4, 2)),
        jnp.ones((2, 3, 3, 3)),
        stride=1,
        padding=1,
        dilation=1,
        padding_mode="reflect",
    )
    assert (
        conv.stride == (1, 1)
        and conv.padding == ((1, 1), (1, 1))
        and conv.padding_mode == "REFLECT"
    )
    with pytest.raises(ValueError, match=r"stride needs 2 values \(one per spatial dim\)"):
        lowrank.LowRankConv(
            jnp.ones((4, 2)), jnp.ones((2, 3, 3, 3)), stride=(1,), padding=0, dilation=1
        )
    with pytest.raises(
        ValueError, match="padding_mode must be ZEROS, REFLECT, REPLICATE or CIRCULAR"
    ):
        lowrank.LowRankConv(
            jnp.ones((4, 2)),
            jnp.ones((2, 3, 3, 3)),
            stride=1,
            padding=0,
            dilation=1,
            padding_mode="mirror",
        )
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        lowrank.LowRankConv(
            jnp.ones((4, 2)), jnp.ones((2, 3, 3, 3)), jnp.ones(1), stride=1, padding=0, dilation=1
        )


def _linear():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return lowrank.LowRankLinear(
        jax.random.normal(k1, (6, 2)), jax.random.normal(k2, (2, 5)), jax.random.normal(k3, (6,))
    )


def test_lowrank_linear_under_jit_vmap_filter_vmap_and_scan():
    layer = _linear()
    xs = jax.random.normal(jax.random.key(3), (4, 5))
    want = np.asarray(xs, np.float64) @ np.asarray(layer.weight, np.float64).T + np.asarray(
        layer.bias
    )
    np.testing.assert_allclose(jax.jit(jax.vmap(layer))(xs), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eqx.filter_vmap(layer)(xs), want, rtol=1e-5, atol=1e-5)
    _, ys = jax.lax.scan(lambda c, x: (c, layer(x)), None, xs)
    np.testing.assert_allclose(ys, want, rtol=1e-5, atol=1e-5)


def test_gradients_reach_both_factors_and_match_closed_form():
    layer = _linear()
    x = jax.random.normal(jax.random.key(4), (5,))
    g = jax.random.normal(jax.random.key(5), (6,))
    grads = eqx.filter_grad(lambda l: jnp.dot(g, l(x)))(layer)
    u, v = np.asarray(layer.u, np.float64), np.asarray(layer.v, np.float64)
    xf, gf = np.asarray(x, np.float64), np.asarray(g, np.float64)
    np.testing.assert_allclose(grads.u, np.outer(gf, v @ xf), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads.v, np.outer(u.T @ gf, xf), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads.bias, gf, rtol=1e-6)


def test_unbatched_input_is_checked():
    with pytest.raises(ValueError, match=r"unbatched input of shape \(5,\).*jax.vmap"):
        _linear()(jnp.zeros((3, 5)))
    conv = lowrank.LowRankConv(
        jnp.zeros((4, 2)),
        jnp.zeros((2, 3, 3, 3)),
        stride=(1, 1),
        padding=((1, 1), (1, 1)),
        dilation=(1, 1),
    )
    with pytest.raises(ValueError, match=r"unbatched input of shape \(3, \*spatial\)"):
        conv(jnp.zeros((2, 3, 8, 8)))


def test_factor_shapes_are_checked():
    with pytest.raises(ValueError, match=r"u \(\*stack, out, r\) and v \(\*stack, r, in\)"):
        lowrank.LowRankLinear(jnp.zeros((4, 2)), jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        lowrank.LowRankLinear(jnp.zeros((4, 2)), jnp.zeros((2, 5)), jnp.zeros(3))
    with pytest.raises(ValueError, match="lowering must be 'einsum' or 'conv'"):
        lowrank.LowRankConv(
            jnp.zeros((4, 2)),
            jnp.zeros((2, 3, 3)),
            stride=(1,),
            padding=((0, 0),),
            dilation=(1,),
            lowering="fft",
        )


def test_lowrank_conv_under_jit_grad_vmap_and_scan():
    key = jax.random.key(6)
    dense = eqx.nn.Conv2d(3, 8, 3, stride=2, padding=1, key=key)
    low = lowrank.factorize(dense, rank=2)
    xs = jax.random.normal(key, (4, 3, 9, 9))
    want = jax.vmap(lowrank.densify(low))(xs)
    np.testing.assert_allclose(jax.jit(jax.vmap(low))(xs), want, rtol=1e-5, atol=1e-5)
    _, ys = jax.lax.scan(lambda c, x: (c, low(x)), None, xs)
    np.testing.assert_allclose(ys, want, rtol=1e-5, atol=1e-5)
    grads = eqx.filter_grad(lambda l: jnp.sum(eqx.filter_vmap(l)(xs) ** 2))(low)
    dense_grad = eqx.filter_grad(lambda l: jnp.sum(jax.vmap(l)(xs) ** 2))(
        lowrank.densify(low)
    ).weight
    # chain rule through W = u @ v: dL/du = dL/dW . v^T, with dL/dW from the dense twin
    want_u = np.tensordot(
        np.asarray(dense_grad, np.float64),
        np.asarray(low.v, np.float64),
        axes=([1, 2, 3], [1, 2, 3]),
    )
    np.testing.assert_allclose(grads.u, want_u, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_activation_carrying_linear_equals_the_unfused_composition(activation):
    layer = _linear()
    fused = lowrank.LowRankLinear(layer.u, layer.v, layer.bias, activation=activation)
    xs = jax.random.normal(jax.random.key(3), (4, 5))
    act = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu}[activation]
    np.testing.assert_allclose(
        jax.jit(jax.vmap(fused))(xs), act(jax.vmap(layer)(xs)), rtol=1e-5, atol=1e-6
    )
    g = jax.random.normal(jax.random.key(5), (4, 6))
    loss = lambda unfused: (
        lambda l: jnp.sum(g * (act(jax.vmap(l)(xs)) if unfused else jax.vmap(l)(xs)))
    )
    got, want = eqx.filter_grad(loss(False))(fused), eqx.filter_grad(loss(True))(layer)
    for name in ("u", "v", "bias"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6)
    assert fused.with_impl("pallas").activation == activation


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_cola_linear_forward_and_gradients_match_float64_numpy(impl):
    layer = _linear()
    cola = lowrank.LowRankLinear(layer.u, layer.v, layer.bias, inner_activation="silu", impl=impl)
    xs = jax.random.normal(jax.random.key(3), (4, 5))
    g = jax.random.normal(jax.random.key(5), (4, 6))
    y, grads = eqx.filter_jit(eqx.filter_value_and_grad(lambda l: jnp.sum(g * jax.vmap(l)(xs))))(
        cola
    )
    u, v, c, x, gf = (np.asarray(a, np.float64) for a in (layer.u, layer.v, layer.bias, xs, g))
    t = x @ v.T
    s = 1.0 / (1.0 + np.exp(-t))
    h = t * s
    np.testing.assert_allclose(y, np.sum(gf * (h @ u.T + c)), rtol=1e-5)
    dt = (gf @ u) * s * (1.0 + t * (1.0 - s))
    np.testing.assert_allclose(grads.u, gf.T @ h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads.v, dt.T @ x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads.bias, gf.sum(0), rtol=1e-5, atol=1e-6)


def test_bad_activations_are_named():
    layer = _linear()
    for name in ("activation", "inner_activation"):
        with pytest.raises(
            ValueError, match=rf"LowRankLinear: {name} must be one of .*'silu'\), got 'tanh'"
        ):
            lowrank.LowRankLinear(layer.u, layer.v, **{name: "tanh"})
