"""NKP: Gaussian closed forms vs Monte Carlo and quadrature, the rescaling law, NKP vs
spectral, the calibrated variant vs whitened, and bad inputs.

References are float64 (numpy, scipy, or jax under `jax.enable_x64`)."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

import lowrank
from lowrank._gaussian_expectations import (
    arccos_kernel,
    expected_sq_diff,
    expected_square,
    relu_centred_sq_diff,
    relu_cross_moment,
)
from lowrank._initializers import LayerProblem, Spectral, available_initializers
from lowrank._nkp import NKP, held_out_rows
from lowrank._nkp_calibrated import calibrated_nkp
from lowrank._whitened import Whitened


def identity(x):
    return x


def np_relu(x):
    return np.maximum(x, 0.0)


def np_gelu(x):  # jax.nn.gelu's default tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


NUMPY_TWIN = {jax.nn.relu: np_relu, jax.nn.gelu: np_gelu, jnp.tanh: np.tanh}


def mc_close(samples, value, sigmas=5.0):
    """|mean(samples) - value| within `sigmas` standard errors (plus a hair)."""
    se = samples.std() / np.sqrt(samples.size)
    assert abs(samples.mean() - float(value)) <= sigmas * se + 1e-6, (samples.mean(), value, se)


# ------------------------------------------------------------------ closed forms


def test_arccos_kernel_matches_monte_carlo():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 5))
    x = rng.normal(size=(400_000, 5))
    ya, yb = np_relu(x @ a), np_relu(x @ b)
    rho = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    with jax.enable_x64(True):
        kappa = float(arccos_kernel(jnp.float64(rho)))
    mc_close(ya * yb, np.linalg.norm(a) * np.linalg.norm(b) * kappa)
    mc_close(ya**2, np.linalg.norm(a) ** 2 / 2)


CASES = [  # mean1, std1, mean2, scale2 (signed), corr
    (0.0, 1.0, 0.0, 0.7, 0.3),
    (0.3, 1.2, -0.5, 0.8, 0.9),
    (-1.0, 0.5, 0.4, -1.3, 0.6),
    (0.5, 2.0, 1.0, 0.4, -0.7),
]


@pytest.mark.parametrize("activation", [jax.nn.relu, jax.nn.gelu, jnp.tanh])
@pytest.mark.parametrize("case", CASES)
def test_expected_sq_diff_matches_monte_carlo(activation, case):
    m1, s1, m2, t2, rho = case
    x1, x2 = np.random.default_rng(1).normal(size=(2, 200_000))
    z1, z2 = m1 + s1 * x1, m2 + t2 * (rho * x1 + np.sqrt(1 - rho**2) * x2)
    f = NUMPY_TWIN[activation]
    with jax.enable_x64(True):
        diff = expected_sq_diff(activation, jnp.float64(m1), s1, m2, t2, rho)
        square = expected_square(activation, jnp.float64(m1), s1)
    mc_close((f(z1) - f(z2)) ** 2, diff)
    mc_close(f(z1) ** 2, square)


@pytest.mark.parametrize("case", CASES)
def test_relu_cross_moment_matches_quadrature(case):
    """Against scipy.quad of E[relu(z1)·E(relu(z2) | ξ1)], split at the kink."""
    m1, s1, m2, t2, rho = case
    s2, r = abs(t2), np.sign(t2) * rho

    def conditional(x):  # E relu(N(mu, sd²)) with z2 | ξ1 = x
        mu, sd = m2 + s2 * r * x, s2 * np.sqrt(1 - r**2)
        return mu * stats.norm.cdf(mu / sd) + sd * stats.norm.pdf(mu / sd)

    kink = -m1 / s1
    integrand = lambda x: np_relu(m1 + s1 * x) * conditional(x) * stats.norm.pdf(x)
    reference = integrate.quad(integrand, kink, np.inf, epsabs=1e-12, epsrel=1e-10)[0]
    with jax.enable_x64(True):
        got = float(relu_cross_moment(jnp.float64(m1), s1, m2, s2, r))
        centred = float(relu_cross_moment(jnp.float64(0.0), s1, 0.0, s2, r))
        kappa = float(arccos_kernel(jnp.float64(r)))
        sq = float(relu_centred_sq_diff(jnp.float64(s1), t2, rho))
        general = float(expected_sq_diff(jax.nn.relu, jnp.float64(0.0), s1, 0.0, t2, rho))
    assert got == pytest.approx(reference, rel=1e-9, abs=1e-12)
    assert centred == pytest.approx(s1 * s2 * kappa, rel=1e-9)
    assert sq == pytest.approx(general, rel=1e-9, abs=1e-12)


def test_gauss_hermite_is_exact_for_polynomials():
    with jax.enable_x64(True):
        square = expected_square(lambda x: x**2, jnp.float64(0.3), 1.7)  # E z⁴
        diff = expected_sq_diff(identity, jnp.float64(0.3), 1.7, -0.2, -0.9, 0.4)
    mu, s = 0.3, 1.7
    assert float(square) == pytest.approx(mu**4 + 6 * mu**2 * s**2 + 3 * s**4, rel=1e-12)
    expected = 0.5**2 + 1.7**2 + 0.9**2 - 2 * 0.4 * 1.7 * -0.9
    assert float(diff) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("activation", [jax.nn.relu, jnp.tanh])
def test_closed_forms_are_finite_with_gradients_at_the_edges(activation):
    """ρ = ±1, zero scales and zero stds: finite values and gradients (no NaN escapes)."""
    std = jnp.array([1.0, 1.0, 1.0, 0.0, 1.0])
    scale = jnp.array([1.0, 1.0, 0.0, 1.0, -2.0])
    corr = jnp.array([1.0, -1.0, 0.5, 0.5, 1.0])

    @jax.jit
    def values_and_grads(std, scale, corr):
        def f(std, scale, corr):
            return jnp.sum(expected_sq_diff(activation, 0.3, std, 0.2, scale, corr))

        return f(std, scale, corr), jax.grad(f, argnums=(0, 1, 2))(std, scale, corr)

    value, grads = values_and_grads(std, scale, corr)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)


# ------------------------------------------------------------------ Gaussian NKP


def closed_form_objective(activation, weight, bias, u, v, new_bias, scale=1.0):
    """Σ_i E(σ(w_i·x+b_i) - σ(w'_i·x+b'_i))² for x ~ N(0, s²I), float64 from the factors."""
    w = np.asarray(weight, np.float64)
    wp = np.asarray(u, np.float64) @ np.asarray(v, np.float64)
    b = np.zeros(len(w)) if bias is None else np.asarray(bias, np.float64)
    nb = b if new_bias is None else np.asarray(new_bias, np.float64)
    a, q = np.linalg.norm(w, axis=1), np.linalg.norm(wp, axis=1)
    corr = np.sum(w * wp, axis=1) / np.maximum(a * q, 1e-300)
    with jax.enable_x64(True):
        b = jnp.asarray(b)
        err = expected_sq_diff(activation, b, scale * a, nb, scale * q, corr)
        return float(jnp.sum(err)), float(jnp.sum(expected_square(activation, b, scale * a)))


def truncated_svd(w, r):
    U, S, Vt = np.linalg.svd(np.asarray(w, np.float64))
    return (U[:, :r] * S[:r]) @ Vt[:r]


@pytest.mark.parametrize("with_bias", [False, True])
def test_identity_activation_equals_svd(with_bias):
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=(10, 7)), jnp.float32)
    b = jnp.asarray(rng.normal(size=10), jnp.float32) if with_bias else None
    out = NKP(activation=identity, input_scale=1.3)(LayerProblem("fc", w, b, 3), key=None)
    np.testing.assert_allclose(np.asarray(out.u @ out.v), truncated_svd(w, 3), atol=2e-4)
    if with_bias:
        np.testing.assert_allclose(np.asarray(out.bias), np.asarray(b), atol=1e-5)
    else:
        assert out.bias is None
    tail = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)[3:]
    total = np.sum(np.asarray(w, np.float64) ** 2)  # E‖Wx‖² ∝ ‖W‖²; bias cancels in the ratio
    if not with_bias:
        assert out.function_error == pytest.approx(np.sum(tail**2) / total, rel=1e-4)


def test_relu_rescaling_law():
    """Centred ReLU: w'_i = c_i·P w_i with c_i = 2κ(ρ_i)/ρ_i, P the projector onto v's rows."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(16, 8)) * np.sqrt(2 / 8), jnp.float32)
    out = NKP()(LayerProblem("fc", w, None, 2), key=None)
    v = np.asarray(out.v, np.float64)
    proj = v.T @ np.linalg.solve(v @ v.T, v)
    w64 = np.asarray(w, np.float64)
    pw = w64 @ proj
    rho = np.linalg.norm(pw, axis=1) / np.linalg.norm(w64, axis=1)
    with jax.enable_x64(True):
        c = 2 * np.asarray(arccos_kernel(jnp.asarray(rho))) / rho
    np.testing.assert_allclose(np.asarray(out.u @ out.v, np.float64), c[:, None] * pw, atol=2e-5)
    num, den = closed_form_objective(jax.nn.relu, w, None, out.u, out.v, None)
    assert out.function_error == pytest.approx(num / den, rel=1e-4)
    spectral = Spectral()(LayerProblem("fc", w, None, 2), key=None)
    assert num < closed_form_objective(jax.nn.relu, w, None, spectral.u, spectral.v, None)[0]


@pytest.mark.parametrize("activation", [jax.nn.relu, jax.nn.gelu])
def test_function_error_matches_monte_carlo(activation):
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.normal(size=(16, 8)) / np.sqrt(8), jnp.float32)
    b = jnp.asarray(0.3 * rng.normal(size=16), jnp.float32)
    out = NKP(activation=activation, input_scale=1.5)(LayerProblem("fc", w, b, 2), key=None)
    f = NUMPY_TWIN[activation]
    x = 1.5 * rng.normal(size=(100_000, 8))
    w64, wp = np.asarray(w, np.float64), np.asarray(out.u @ out.v, np.float64)
    y = f(x @ w64.T + np.asarray(b, np.float64))
    err = np.sum((y - f(x @ wp.T + np.asarray(out.bias, np.float64))) ** 2, axis=1)
    ratio = err.mean() / np.sum(y**2, axis=1).mean()
    assert out.function_error == pytest.approx(ratio, rel=0.03)


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    activation=st.sampled_from([jax.nn.relu, jnp.tanh]),
    with_bias=st.booleans(),
    scale=st.floats(0.3, 3.0),
)
def test_nkp_never_worse_than_spectral(seed, activation, with_bias, scale):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(16, 8)) * rng.uniform(0.2, 2, size=(16, 1)), jnp.float32)
    b = jnp.asarray(rng.normal(size=16), jnp.float32) if with_bias else None
    problem = LayerProblem("fc", w, b, 2, activation)
    out = NKP(input_scale=scale)(problem, key=None)
    spectral = Spectral()(problem, key=None)
    nkp_err, den = closed_form_objective(activation, w, b, out.u, out.v, out.bias, scale)
    spec_err, _ = closed_form_objective(activation, w, b, spectral.u, spectral.v, b, scale)
    assert nkp_err <= spec_err + 1e-5 * den
    assert out.function_error == pytest.approx(nkp_err / den, rel=1e-3, abs=1e-6)


def test_degenerate_weights_stay_finite():
    w = jnp.zeros((16, 8)).at[0, 0].set(1.0)  # zero rows, rank 1
    out = NKP()(LayerProblem("fc", w, jnp.ones(16), 2), key=None)
    assert all(np.all(np.isfinite(a)) for a in (out.u, out.v, out.bias))
    assert np.isfinite(out.function_error) and out.function_error < 1e-4
    zero = NKP()(LayerProblem("fc", jnp.zeros((16, 8)), None, 2), key=None)
    assert np.all(np.asarray(zero.u @ zero.v) == 0) and zero.function_error == 0.0


def test_bfloat16_layers_are_solved_in_float32():
    rng = np.random.default_rng(8)
    w = jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=16), jnp.bfloat16)
    low = NKP()(LayerProblem("fc", w, b, 2), key=None)
    ref = NKP()(LayerProblem("fc", w.astype(jnp.float32), b.astype(jnp.float32), 2), key=None)
    assert low.u.dtype == jnp.float32 and low.bias.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(low.u @ low.v), np.asarray(ref.u @ ref.v), atol=1e-5)
    assert low.function_error == pytest.approx(ref.function_error, rel=1e-5)


# ------------------------------------------------------------------ calibrated NKP


def correlated_inputs(rng, samples, dim, latent=4):
    mix = rng.normal(size=(latent, dim))
    x = rng.normal(size=(samples, latent)) @ mix + 0.3 * rng.normal(size=(samples, dim)) + 0.5
    return jnp.asarray(x, jnp.float32)


def empirical_objective(activation, weight, bias, u, v, new_bias, x, dense=None):
    """Relative post-activation error of the factors on inputs x against the dense layer
    on `dense` (default: x), float64."""
    f = NUMPY_TWIN.get(activation, lambda z: z)
    x = np.asarray(x, np.float64)
    dense = x if dense is None else np.asarray(dense, np.float64)
    y = f(dense @ np.asarray(weight, np.float64).T + np.asarray(bias, np.float64))
    wp = np.asarray(u, np.float64) @ np.asarray(v, np.float64)
    approx = f(x @ wp.T + np.asarray(new_bias, np.float64))
    return np.sum((y - approx) ** 2) / np.sum(y**2)


def drifted(rng, x):
    """Inputs as a factorized upstream would give them: x mixed and jittered."""
    mix = jnp.eye(x.shape[1]) + 0.2 * rng.normal(size=(x.shape[1],) * 2)
    return (x @ mix + 0.1 * rng.normal(size=x.shape)).astype(jnp.float32)


def _linear_layer_problem(sequential: bool, activation) -> LayerProblem:
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.normal(size=(12, 8)), jnp.float32)
    b = jnp.asarray(rng.normal(size=12), jnp.float32)
    x = correlated_inputs(rng, 300, 8)
    seen, dense = (drifted(rng, x), x) if sequential else (x, None)
    return LayerProblem("fc", w, b, 3, activation, seen, dense)


@pytest.mark.parametrize("sequential", [False, True])
def test_calibrated_identity_equals_whitened(sequential):
    """A user's identity activation: the alternations run and end at the whitened fit."""
    problem = _linear_layer_problem(sequential, None)
    out = NKP(activation=identity)(problem, key=None)
    ref = Whitened()(problem, key=None)
    np.testing.assert_allclose(np.asarray(out.u @ out.v), np.asarray(ref.u @ ref.v), atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.bias), np.asarray(ref.bias), atol=1e-4)


@pytest.mark.parametrize("sequential", [False, True])
def test_layer_known_linear_gets_the_whitened_fit_without_alternations(sequential, monkeypatch):
    """activation `identity` (what the index records for a layer feeding no
    nonlinearity): NKP's objective is the whitened fit's, so it returns that fit and
    runs no nonlinear solve."""
    from lowrank import _nkp
    from lowrank._select import identity as known_linear

    def unexpected(*args, **kwargs):
        raise AssertionError("calibrated NKP ran on a linear layer")

    monkeypatch.setattr(_nkp, "calibrated_nkp", unexpected)
    problem = _linear_layer_problem(sequential, known_linear)
    out, ref = NKP()(problem, key=None), Whitened()(problem, key=None)
    for a, c in zip((out.u, out.v, out.bias), (ref.u, ref.v, ref.bias)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    assert out.function_error == ref.function_error


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("samples", [400, 5])  # 5 < 8 dims: singular second moment
def test_calibrated_relu_beats_whitened(samples, sequential):
    rng = np.random.default_rng(6)
    x = correlated_inputs(rng, samples, 8).at[:, 3].set(2.0)  # plus a constant feature
    w = jnp.asarray(rng.normal(size=(16, 8)) / 4, jnp.float32)
    b = jnp.asarray(0.3 * rng.normal(size=16), jnp.float32)
    seen, dense = (drifted(rng, x), x) if sequential else (x, None)
    problem = LayerProblem("fc", w, b, 2, jax.nn.relu, seen, dense)
    out, ref = NKP()(problem, key=None), Whitened()(problem, key=None)
    assert all(np.all(np.isfinite(a)) for a in (out.u, out.v, out.bias))
    nkp_err = empirical_objective(jax.nn.relu, w, b, out.u, out.v, out.bias, seen, dense)
    ref_err = empirical_objective(jax.nn.relu, w, b, ref.u, ref.v, ref.bias, seen, dense)
    assert out.function_error == pytest.approx(nkp_err, rel=1e-3, abs=1e-7)
    assert nkp_err <= ref_err * (1 + 1e-4)
    if samples == 400:
        assert nkp_err < 0.97 * ref_err  # the nonlinear fit helps on real inputs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibrated_fit_on_few_rows_generalizes_no_worse_than_whitened(seed):
    """50 calibration rows for 45 inputs: the alternations could memorize them. The ridge
    and the held-out stop keep NKP's error on fresh rows at or below whitened's."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(45, 45)) * rng.uniform(0.05, 1.0, 45)
    x, fresh = rng.normal(size=(50, 45)) @ mix, rng.normal(size=(4000, 45)) @ mix
    w = jnp.asarray(rng.normal(size=(30, 45)) / np.sqrt(45), jnp.float32)
    b = jnp.asarray(0.1 * rng.normal(size=30), jnp.float32)
    problem = LayerProblem("fc", w, b, 3, jax.nn.relu, jnp.asarray(x, jnp.float32))
    out, ref = NKP()(problem, key=None), Whitened()(problem, key=None)
    nkp_fresh = empirical_objective(jax.nn.relu, w, b, out.u, out.v, out.bias, fresh)
    ref_fresh = empirical_objective(jax.nn.relu, w, b, ref.u, ref.v, ref.bias, fresh)
    assert nkp_fresh <= ref_fresh * (1 + 1e-4)


@pytest.mark.parametrize("stop", [0, 2])
def test_calibrated_alternations_end_at_stop(stop):
    """The final fit makes `stop` alternations, not all `iterations` with the later ones
    discarded: its result is the one with `iterations` = `stop`, and the held-out
    losses past `stop` are not computed."""
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        x = jnp.asarray(correlated_inputs(rng, 200, 8), jnp.float64)
        held = (jnp.asarray(correlated_inputs(rng, 50, 8), jnp.float64), None)
        w = jnp.asarray(rng.normal(size=(6, 8)), jnp.float64)
        b = jnp.asarray(rng.normal(size=6), jnp.float64)
        kw = dict(rank=2, activation=jax.nn.relu, fit_bias=True, ridge=1e-3)
        short = calibrated_nkp(w, b, (x, None), held, jnp.int32(stop), iterations=stop, **kw)
        long = calibrated_nkp(w, b, (x, None), held, jnp.int32(stop), iterations=6, **kw)
        for a, c in zip(short[:5], long[:5]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(long[5][: stop + 1], short[5], rtol=1e-12)
        assert np.all(np.asarray(long[5][stop + 1 :]) == 0) and np.all(long[5][: stop + 1] > 0)


def test_held_out_rows_are_a_fifth_in_contiguous_chunks():
    assert held_out_rows(39) is None
    mask = held_out_rows(1000)
    assert mask.sum() == 200
    starts = np.flatnonzero(np.diff(mask.astype(int)) == 1) + 1
    assert len(starts) == 4 and all(mask[s : s + 50].all() for s in starts)


def test_calibrated_without_bias_returns_none():
    rng = np.random.default_rng(7)
    x = correlated_inputs(rng, 50, 6)
    w = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
    out = NKP()(LayerProblem("fc", w, None, 1, jax.nn.relu, x), key=None)
    assert out.bias is None
    zeros = np.zeros(5)
    err = empirical_objective(jax.nn.relu, w, zeros, out.u, out.v, zeros, x)
    assert out.function_error == pytest.approx(err, rel=1e-3)


# ------------------------------------------------------------------ errors


def test_registered():
    assert {"nkp", "whitened"} <= set(available_initializers())


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(weight=jnp.full((4, 3), jnp.nan)), "layer blocks.1.fc has non-finite weights"),
        (dict(bias=jnp.array([0.0, jnp.inf, 0.0, 0.0])), "blocks.1.fc has a non-finite bias"),
        (dict(inputs=jnp.full((5, 3), jnp.nan)), "calibration inputs for blocks.1.fc contain NaN"),
        (dict(inputs=jnp.ones((5, 2))), r"calibration inputs for blocks.1.fc have shape \(5, 2\)"),
        (dict(rank=4), r"rank 4 is outside \[1, min\(4, 3\)\] for blocks.1.fc"),
        (dict(rank=0), r"rank 0 is outside"),
        (
            dict(inputs=jnp.ones((5, 3)), dense_inputs=jnp.ones((4, 3))),
            r"dense_inputs for blocks.1.fc must pair row by row with inputs, got \(4, 3\)",
        ),
        (
            dict(inputs=jnp.ones((5, 3)), dense_inputs=jnp.full((5, 3), jnp.nan)),
            "dense-model inputs for blocks.1.fc contain NaN/inf",
        ),
    ],
)
def test_bad_problems_raise(change, match):
    base = dict(path="blocks.1.fc", weight=jnp.ones((4, 3)), bias=jnp.zeros(4), rank=1)
    with pytest.raises(ValueError, match=match):
        NKP()(LayerProblem(**{**base, **change}), key=None)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="NKP input_scale must be a positive number, got -1"):
        NKP(input_scale=-1.0)
    with pytest.raises(ValueError, match="NKP iterations and calibration_iterations must be >= 0"):
        NKP(iterations=-2)
    with pytest.raises(ValueError, match="NKP ridge must be a finite number >= 0, got nan"):
        NKP(ridge=float("nan"))


class _TwoFC(eqx.Module):
    """Two Linears in a custom module: the activation after each is unknown to lowrank.
    (One shape for both, so that NKP compiles once per activation.)"""

    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self):
        k1, k2 = jax.random.split(jax.random.key(0))
        self.fc1, self.fc2 = eqx.nn.Linear(16, 16, key=k1), eqx.nn.Linear(16, 16, key=k2)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


def test_nkp_warns_when_it_assumes_relu_and_labels_the_f_err():
    with pytest.warns(
        UserWarning,
        match=r"init 'nkp' assumes ReLU after fc1, fc2: their activation is unknown\. .*activations=",
    ):
        _, plan = lowrank.factorize(_TwoFC(), rank=3, init="nkp", return_plan=True)
    assumed = "inputs x ~ N(0, 1²·I), ReLU after the layer (its activation is unknown)"
    assert plan["fc1"].assumes == assumed and plan["fc2"].assumes == assumed
    assert any("assumes ReLU after fc1, fc2" in n for n in plan.notes)
    text = str(plan)
    assert f"{plan['fc1'].function_error:.3f}*" in text
    assert f"* f-err assumes {assumed}, not measured: fc1, fc2" in text
    assert lowrank.Plan.from_json(plan.to_json()) == plan


def test_nkp_told_the_activations_does_not_warn_and_labels_only_the_gaussian():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, plan = lowrank.factorize(
            _TwoFC(),
            rank=3,
            init="nkp",
            activations={"fc1": jnp.tanh, "fc2": None},
            return_plan=True,
        )
        lowrank.factorize(_TwoFC(), rank=3, init=NKP(activation=jnp.tanh, input_scale=2.0))
    assert plan["fc1"].assumes == "inputs x ~ N(0, 1²·I)"
    assert not any("ReLU" in n for n in plan.notes)
    mlp_plan = lowrank.factorize(
        eqx.nn.MLP(16, 16, 16, 1, key=jax.random.key(0)), rank=3, init="nkp", return_plan=True
    )[1]
    assert mlp_plan["layers.0"].assumes == "inputs x ~ N(0, 1²·I)"  # eqx.nn.MLP: activations known
    spectral = lowrank.factorize(_TwoFC(), rank=3, return_plan=True)[1]
    assert spectral["fc1"].assumes is None and "f-err assumes" not in str(spectral)


def test_calibrated_nkp_with_unknown_activation_warns_and_says_so():
    xs = jax.random.normal(jax.random.key(1), (64, 16))
    with pytest.warns(UserWarning, match=r"init 'nkp' assumes ReLU after fc1, fc2"):
        _, plan = lowrank.factorize(_TwoFC(), rank=3, init="nkp", calibration=xs, return_plan=True)
    assert plan["fc1"].assumes == "ReLU after the layer (its activation is unknown)"
