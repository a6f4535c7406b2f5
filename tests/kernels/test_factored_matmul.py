"""factored_matmul: forward and gradients vs float64 autodiff, under every transform."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import _dispatch

from ._jaxpr import find_eqns, out_shapes
from ._reference import assert_close, factors, forward_and_vjp


def _value_and_vjp(impl, activation):
    @jax.jit
    def run(x, a, b, bias, g):
        f = lambda x, a, b, bias: kernels.factored_matmul(x, a, b, bias, activation, impl)
        y, vjp = jax.vjp(f, x, a, b, bias)
        return y, vjp(g)

    return run


@pytest.mark.parametrize(
    "shape, activation, bias",
    [
        ((37, 129, 5, 70), "gelu", True),
        ((37, 129, 5, 70), "relu", False),
        ((16, 64, 1, 33), "silu", True),  # r = 1
        ((1, 40, 17, 17), None, True),  # M = 1, r = min(K, N)
        ((9, 33, 33, 48), "none", False),  # r = K
    ],
)
def test_forward_and_gradients_match_float64(shape, activation, bias):
    m, k, r, n = shape
    x, a, b, c = factors(m, k, r, n, bias=bias)
    g = jnp.asarray(np.random.default_rng(1).standard_normal((m, n)), jnp.float32)
    y, grads = _value_and_vjp("pallas", activation)(x, a, b, c, g)
    want_y, want_grads = forward_and_vjp(x, a, b, c, activation, g)
    assert_close(y, want_y, 1e-5)
    for got, want in zip(grads, want_grads):
        assert (got is None) == (want is None)
        if want is not None:
            assert_close(got, want, 1e-5)


def test_bfloat16_forward_and_gradients_within_1e_2():
    x, a, b, c = factors(33, 96, 8, 40, dtype=jnp.bfloat16)
    g = jnp.asarray(np.random.default_rng(1).standard_normal((33, 40)), jnp.bfloat16)
    y, grads = _value_and_vjp("pallas", "gelu")(x, a, b, c, g)
    want_y, want_grads = forward_and_vjp(x, a, b, c, "gelu", g)
    assert y.dtype == jnp.bfloat16 and all(v.dtype == jnp.bfloat16 for v in grads)
    assert_close(y, want_y, 1e-2)
    for got, want in zip(grads, want_grads):
        assert_close(got, want, 1e-2)


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_xla_and_auto_match_float64(impl):
    x, a, b, c = factors(37, 129, 5, 70)
    g = jnp.ones((37, 70), jnp.float32)
    y, grads = _value_and_vjp(impl, "silu")(x, a, b, c, g)
    want_y, want_grads = forward_and_vjp(x, a, b, c, "silu", g)
    assert_close(y, want_y, 1e-5)
    for got, want in zip(grads, want_grads):
        assert_close(got, want, 1e-5)


def test_auto_is_plain_xla_without_measurements():
    x, a, b, c = factors(8, 16, 2, 8)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: kernels.factored_matmul(x, a, b, c, "gelu").sum()))(x)
    assert not find_eqns(jaxpr, "pallas_call")


def test_auto_follows_the_measured_table(monkeypatch):
    kind = jax.devices()[0].device_kind
    monkeypatch.setitem(
        _dispatch.MEASURED, kind, {("float32", "m<=16", "kn<=1024", "r<=64"): frozenset({"fwd"})}
    )
    x, a, b, c = factors(37, 16, 2, 8)
    f = lambda x: kernels.factored_matmul(x, a, b, c, "gelu").sum()
    assert not find_eqns(jax.make_jaxpr(f)(x), "pallas_call")  # 37 rows: not measured
    assert len(find_eqns(jax.make_jaxpr(f)(x[:8]), "pallas_call")) == 1
    # the table names only the forward kernel: the backward stays in XLA
    assert len(find_eqns(jax.make_jaxpr(jax.grad(f))(x[:8]), "pallas_call")) == 1
    g = jnp.asarray(np.random.default_rng(1).standard_normal((8, 8)), jnp.float32)
    y, grads = _value_and_vjp("auto", "gelu")(x[:8], a, b, c, g)
    want_y, want_grads = forward_and_vjp(x[:8], a, b, c, "gelu", g)
    assert_close(y, want_y, 1e-5)
    for got, want in zip(grads, want_grads):
        assert_close(got, want, 1e-5)


def test_vmap_of_unbatched_calls_runs_one_kernel_on_the_whole_batch():
    x, a, b, c = factors(37, 129, 5, 70)
    f = jax.vmap(lambda xi: kernels.factored_matmul(xi, a, b, c, "gelu", "pallas"))
    [eqn] = find_eqns(jax.make_jaxpr(f)(x), "pallas_call")
    assert out_shapes(eqn) == [(37, 70)]
    want, _ = forward_and_vjp(x, a, b, c, "gelu", np.zeros((37, 70)))
    assert_close(jax.jit(f)(x), want, 1e-5)


def test_grad_of_vmap_and_vmap_of_grad():
    x, a, b, c = factors(12, 20, 3, 18)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((12, 18)), jnp.float32)

    def loss(a, xi, wi):
        return jnp.sum(kernels.factored_matmul(xi, a, b, c, "silu", "pallas") * wi)

    def both(a):
        total = jax.grad(lambda a: jax.vmap(loss, (None, 0, 0))(a, x, w).sum())(a)
        per_example = jax.vmap(jax.grad(loss), (None, 0, 0))(a, x, w)
        return total, per_example

    jaxpr = jax.make_jaxpr(both)(a)
    assert {out_shapes(e)[0][0] for e in find_eqns(jaxpr, "pallas_call")} == {12}
    total, per_example = jax.jit(both)(a)
    _, want = forward_and_vjp(x, a, b, c, "silu", w)
    assert_close(total, want[1], 1e-5)
    with jax.enable_x64(True):
        want_per_example = [
            forward_and_vjp(x[i : i + 1], a, b, c, "silu", w[i : i + 1])[1][1] for i in range(12)
        ]
    assert_close(per_example, np.stack(want_per_example), 1e-5)


def test_leading_dims_and_nested_vmap():
    x, a, b, c = factors(6, 20, 3, 18)
    xs = x.reshape(2, 3, 20)
    per_example = lambda xi: kernels.factored_matmul(xi, a, b, c, "relu", "pallas")
    both = lambda xs: (
        kernels.factored_matmul(xs, a, b, c, "relu", "pallas"),
        jax.vmap(jax.vmap(per_example))(xs),
    )
    assert [out_shapes(e) for e in find_eqns(jax.make_jaxpr(both)(xs), "pallas_call")] == [
        [(6, 18)]
    ] * 2
    want, _ = forward_and_vjp(x, a, b, c, "relu", np.zeros((6, 18)))
    for y in jax.jit(both)(xs):
        assert_close(y.reshape(6, 18), want, 1e-5)


def test_filter_vmap_inside_scan_with_grad():
    # Two layers K -> K with stacked factors, scanned; each layer vmapped over the batch.
    x, a, b, c = factors(5, 12, 3, 12)
    stack = lambda v: jnp.stack([v, v[::-1] * 0.5])
    weights = (stack(a), stack(b), stack(c))

    def net(weights, x):
        def layer(h, w):
            wa, wb, wc = w
            return eqx.filter_vmap(
                lambda hi: kernels.factored_matmul(hi, wa, wb, wc, "gelu", "pallas")
            )(h), None

        return jax.lax.scan(layer, x, weights)[0].sum()

    got = jax.jit(jax.grad(net))(weights, x)

    def net64(weights, x):
        for wa, wb, wc in zip(*weights):
            x = jax.nn.gelu((x @ wa) @ wb + wc)
        return x.sum()

    with jax.enable_x64(True):
        to64 = lambda v: jnp.asarray(np.asarray(v, np.float64))
        want = jax.grad(net64)(jax.tree.map(to64, weights), to64(x))
        for g, w in zip(got, want):
            assert_close(g, np.asarray(w), 1e-5)


def test_batched_weights_fall_back_to_xla():
    x, a, b, c = factors(4, 10, 2, 6)
    a_ens = jnp.stack([a, 2 * a, -a, a / 3])
    f = jax.vmap(lambda xi, ai: kernels.factored_matmul(xi, ai, b, c, "gelu", "pallas"))
    assert not find_eqns(jax.make_jaxpr(f)(x, a_ens), "pallas_call")
    x64, a64, b64, c64 = (np.asarray(v, np.float64) for v in (x, a_ens, b, c))
    z = np.einsum("ek,ekr,rn->en", x64, a64, b64) + c64
    assert_close(
        f(x, a_ens), 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3))), 1e-5
    )


def test_promotes_mixed_dtypes_and_accepts_numpy():
    x, a, b, c = factors(3, 8, 2, 5)
    y = kernels.factored_matmul(np.asarray(x), a.astype(jnp.bfloat16), b, c, "relu")
    assert y.dtype == jnp.float32
    want, _ = forward_and_vjp(x, a.astype(jnp.bfloat16), b, c, "relu", np.zeros((3, 5)))
    assert_close(y, want, 1e-5)


def test_zero_rows():
    x, a, b, c = factors(1, 8, 2, 5)
    assert kernels.factored_matmul(x[:0], a, b, c, "gelu", "pallas").shape == (0, 5)


X, A, B, BIAS = (jnp.zeros(s) for s in [(4, 6), (6, 2), (2, 5), (5,)])


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (
            (X, A, B),
            {"impl": "cuda"},
            r"impl must be one of \('auto', 'xla', 'pallas'\), got 'cuda'",
        ),
        ((X, A, B), {"activation": "tanh"}, r"activation must be one of .*'silu'\), got 'tanh'"),
        (
            (jnp.zeros(()), A, B),
            {},
            r"x must have shape \(\.\.\., K\) with at least one axis, got shape \(\)",
        ),
        (
            (X, A[:5], B),
            {},
            r"a must have shape \(K, r\) = \(6, r\) to match x of shape \(4, 6\), got shape \(5, 2\)",
        ),
        ((X, A[None], B), {}, r"a must have shape \(K, r\) = \(6, r\) .* got shape \(1, 6, 2\)"),
        (
            (X, A, B[:1]),
            {},
            r"b must have shape \(r, N\) = \(2, N\) to match a of shape \(6, 2\), got shape \(1, 5\)",
        ),
        ((X, A, B[0]), {}, r"b must have shape \(r, N\) = \(2, N\) .* got shape \(5,\)"),
        (
            (X, A, B, BIAS[:4]),
            {},
            r"bias must have shape \(N,\) = \(5,\) to match b of shape \(2, 5\), got shape \(4,\)",
        ),
        (
            (X.astype(jnp.int32), A, B),
            {},
            r"x must have a floating dtype \(float32 or bfloat16\), got int32",
        ),
        ((X, A, B, BIAS.astype(jnp.int8)), {}, r"bias must have a floating dtype .* got int8"),
        (
            (X.astype(jnp.float16), A.astype(jnp.float16), B.astype(jnp.float16)),
            {"impl": "pallas"},
            r"impl='pallas' takes float32 or bfloat16 inputs, got float16; use impl='xla'",
        ),
    ],
)
def test_bad_inputs_name_the_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kernels.factored_matmul(*args, **kwargs)


def _loss64(x, a, b, c, w):
    return jnp.sum(jax.nn.gelu((x @ a) @ b + c) * w)


def test_grad_of_grad_and_hessian_run_through_the_kernels():
    x, a, b, c = factors(5, 6, 2, 4)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((5, 4)), jnp.float32)
    loss = lambda x, a: jnp.sum(kernels.factored_matmul(x, a, b, c, "gelu", "pallas") * w)
    grad_of_grad = jax.grad(lambda a: jnp.sum(jax.grad(loss)(x, a) ** 2))
    hessian = jax.hessian(loss)
    # the kernels still compute the values; XLA only adds the higher-order terms
    assert find_eqns(jax.make_jaxpr(grad_of_grad)(a), "pallas_call")
    assert find_eqns(jax.make_jaxpr(hessian)(x, a), "pallas_call")
    with jax.enable_x64(True):
        to64 = lambda v: jnp.asarray(np.asarray(v, np.float64))
        x64, a64, b64, c64, w64 = map(to64, (x, a, b, c, w))
        ref = lambda x, a: _loss64(x, a, b64, c64, w64)
        want_gg = jax.grad(lambda a: jnp.sum(jax.grad(ref)(x64, a) ** 2))(a64)
        want_h = jax.hessian(ref)(x64, a64)
    assert_close(jax.jit(grad_of_grad)(a), np.asarray(want_gg), 1e-5)
    assert_close(jax.jit(hessian)(x, a), np.asarray(want_h), 1e-5)


def test_forward_mode_on_the_fused_path_names_the_fallback():
    x, a, b, c = factors(3, 4, 2, 5)
    f = lambda x: kernels.factored_matmul(x, a, b, c, "relu", "pallas")
    with pytest.raises(
        TypeError, match=r"impl='pallas'\): forward-mode autodiff .* use impl='xla'"
    ):
        jax.jvp(f, (x,), (x,))
    with pytest.raises(TypeError, match=r"forward-mode autodiff \(jax.jvp, jax.jacfwd\)"):
        jax.jacfwd(f)(x)
    _, got = jax.jvp(lambda x: kernels.factored_matmul(x, a, b, c, "relu", "xla"), (x,), (x,))
    z = (np.asarray(x, np.float64) @ np.asarray(a, np.float64)) @ np.asarray(b, np.float64)
    assert_close(got, (z + np.asarray(c, np.float64) > 0) * z, 1e-5)  # relu'(z + c) · (x @ a @ b)


def test_explicitly_sharded_arrays_take_xla_or_say_why(monkeypatch):
    x, a, b, c = factors(4, 8, 2, 6)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    want, _ = forward_and_vjp(x, a, b, c, "gelu", np.zeros((4, 6)))
    kind = jax.devices()[0].device_kind
    monkeypatch.setitem(
        _dispatch.MEASURED, kind, {("float32", "m<=16", "kn<=1024", "r<=64"): frozenset({"fwd"})}
    )
    f = lambda x, impl: kernels.factored_matmul(x, a, b, c, "gelu", impl)
    assert find_eqns(
        jax.make_jaxpr(f, static_argnums=1)(x, "auto"), "pallas_call"
    )  # unsharded: measured
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, sharded)
        with pytest.raises(
            ValueError,
            match=r"impl='pallas' cannot run on arrays sharded over Explicit mesh axes \(got P\('data', None\)\).* use impl='xla'",
        ):
            f(xs, "pallas")
        assert not find_eqns(jax.make_jaxpr(f, static_argnums=1)(xs, "auto"), "pallas_call")
        assert_close(jax.jit(f, static_argnums=1)(xs, "auto"), want, 1e-5)
