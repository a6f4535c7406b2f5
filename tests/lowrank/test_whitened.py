"""Whitened SVD (SVD-LLM) against a float64 Cholesky reference, its optimality on the
calibration data, degenerate data, and bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank import _whitened as whitened_module
from lowrank._initializers import LayerProblem, Spectral
from lowrank._whitened import Whitened, reduced_rank_regression, reuse_last, whitening


def cholesky_reference(w, x, rank, centre):
    """SVD-LLM in float64: S = chol(XᵀX/N), W' = [W S]_r S⁻¹ (centred covariance if `centre`)."""
    w, x = np.asarray(w, np.float64), np.asarray(x, np.float64)
    mean = x.mean(axis=0) if centre else np.zeros(x.shape[1])
    xc = x - mean
    s = np.linalg.cholesky(xc.T @ xc / len(x))
    U, S, Vt = np.linalg.svd(w @ s)
    approx = (U[:, :rank] * S[:rank]) @ Vt[:rank] @ np.linalg.inv(s)
    return approx, mean


def inputs(rng, samples, dim, shift=0.5):
    mix = rng.normal(size=(dim, dim)) * rng.uniform(0.1, 2.0, size=dim)
    return jnp.asarray(rng.normal(size=(samples, dim)) @ mix + shift, jnp.float32)


@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_cholesky_reference(with_bias):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(12, 6)), jnp.float32)
    b = jnp.asarray(rng.normal(size=12), jnp.float32) if with_bias else None
    x = inputs(rng, 500, 6)
    out = Whitened()(LayerProblem("fc", w, b, 2, None, x), key=None)
    approx, mean = cholesky_reference(w, x, 2, centre=with_bias)
    scale = np.abs(approx).max()
    np.testing.assert_allclose(np.asarray(out.u @ out.v, np.float64), approx, atol=2e-4 * scale)
    if with_bias:
        expected_bias = np.asarray(b, np.float64) + (np.asarray(w, np.float64) - approx) @ mean
        np.testing.assert_allclose(np.asarray(out.bias), expected_bias, atol=2e-4 * scale)
    else:
        assert out.bias is None
    # Its error on the calibration data, recomputed in float64.
    x64 = np.asarray(x, np.float64)
    bias64 = 0.0 if b is None else np.asarray(b, np.float64)
    new_bias = 0.0 if out.bias is None else np.asarray(out.bias, np.float64)
    y = x64 @ np.asarray(w, np.float64).T + bias64
    approx_y = x64 @ np.asarray(out.u @ out.v, np.float64).T + new_bias
    assert out.function_error == pytest.approx(np.sum((y - approx_y) ** 2) / np.sum(y**2), rel=1e-3)


def test_function_error_on_many_rows_is_estimated_from_an_even_subsample(monkeypatch):
    monkeypatch.setattr(whitened_module, "ERROR_ROWS", 256)
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    x = inputs(rng, 4000, 8)
    out = Whitened()(LayerProblem("fc", w, None, 3, None, x), key=None)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    y, approx_y = x64 @ w64.T, x64 @ np.asarray(out.u @ out.v, np.float64).T
    full = np.sum((y - approx_y) ** 2) / np.sum(y**2)
    every_16th = np.sum((y - approx_y)[::16] ** 2) / np.sum(y[::16] ** 2)  # 250 rows
    assert out.function_error == pytest.approx(every_16th, rel=1e-3)
    assert out.function_error == pytest.approx(full, rel=0.15)


@pytest.mark.parametrize("with_bias", [False, True])
def test_sequential_fit_is_the_reduced_rank_regression_onto_dense_outputs(with_bias):
    """Inputs x̃ (factorized model) paired with dense inputs x: W' is the rank-r least-squares
    map from x̃ to Wx + b, reference built with a float64 Cholesky whitening of x̃."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(10, 6))
    b = rng.normal(size=10) if with_bias else None
    dense = np.asarray(inputs(rng, 400, 6), np.float64)
    seen = dense @ (np.eye(6) + 0.3 * rng.normal(size=(6, 6))) + 0.2 * rng.normal(size=(400, 6))
    problem = LayerProblem(
        "fc",
        jnp.asarray(w, jnp.float32),
        None if b is None else jnp.asarray(b, jnp.float32),
        2,
        None,
        jnp.asarray(seen, jnp.float32),
        jnp.asarray(dense, jnp.float32),
    )
    out = Whitened(ridge=0.0)(problem, key=None)  # plain least squares (the ridge: below)
    target = dense @ w.T
    x_mean = seen.mean(axis=0) if with_bias else np.zeros(6)
    z_mean = target.mean(axis=0) if with_bias else np.zeros(10)
    xc, zc = seen - x_mean, target - z_mean
    least_squares = np.linalg.solve(xc.T @ xc, xc.T @ zc).T
    s = np.linalg.cholesky(xc.T @ xc / len(xc))
    U, S, Vt = np.linalg.svd(least_squares @ s)
    approx = (U[:, :2] * S[:2]) @ Vt[:2] @ np.linalg.inv(s)
    scale = np.abs(approx).max()
    np.testing.assert_allclose(np.asarray(out.u @ out.v, np.float64), approx, atol=2e-4 * scale)
    if with_bias:
        np.testing.assert_allclose(out.bias, b + z_mean - approx @ x_mean, atol=2e-4 * scale)
    y = target + (0.0 if b is None else b)
    fit = seen @ approx.T + (0.0 if b is None else b + z_mean - approx @ x_mean)
    assert out.function_error == pytest.approx(np.sum((y - fit) ** 2) / np.sum(y**2), rel=1e-3)


@pytest.mark.parametrize("rank", [2, 6])
def test_ridge_regression_is_the_penalized_least_squares_optimum(rank):
    """min ‖T - B X‖² + N·δ‖B - P‖² over rank-r B, δ = ridge·mean(λ)·n/N: at full rank the
    normal equations, below it the truncation in the metric C + δI (float64 numpy)."""
    rng = np.random.default_rng(4)
    x = np.asarray(inputs(rng, 9, 6, shift=0.0), np.float64)  # 9 rows, 6 inputs
    t = x @ rng.normal(size=(6, 5)) + 0.5 * rng.normal(size=(9, 5))
    prior = rng.normal(size=(5, 6))
    ridge = 0.3
    mean, basis, eig = whitening(jnp.asarray(x, jnp.float32), centre=False)
    u, v = reduced_rank_regression(
        jnp.asarray(t, jnp.float32),
        jnp.asarray(x, jnp.float32),
        basis,
        eig,
        rank,
        prior=jnp.asarray(prior, jnp.float32),
        ridge=ridge,
    )
    n_rows = len(x)
    gram = x.T @ x / n_rows
    delta = ridge * np.trace(gram) / 6 * 6 / n_rows
    optimum = np.linalg.solve(gram + delta * np.eye(6), (t.T @ x / n_rows + delta * prior).T).T
    if rank < 5:
        s = np.linalg.cholesky(gram + delta * np.eye(6))
        U, S, Vt = np.linalg.svd(optimum @ s)
        optimum = (U[:, :rank] * S[:rank]) @ Vt[:rank] @ np.linalg.inv(s)
    np.testing.assert_allclose(
        np.asarray(u @ v, np.float64), optimum, atol=1e-4 * np.abs(optimum).max()
    )


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), samples=st.sampled_from([3, 40]), rank=st.integers(1, 3))
def test_never_worse_than_spectral_on_calibration_data(seed, samples, rank):
    """The linear output error on the calibration inputs: whitened ≤ spectral, always finite."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
    x = inputs(rng, samples, 5)
    problem = LayerProblem("fc", w, None, rank, None, x)
    out, spectral = Whitened()(problem, key=None), Spectral()(problem, key=None)
    assert np.all(np.isfinite(np.asarray(out.u))) and np.all(np.isfinite(np.asarray(out.v)))
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)

    def err(f):
        return np.sum((x64 @ (w64 - np.asarray(f.u @ f.v, np.float64)).T) ** 2)

    assert err(out) <= err(spectral) * (1 + 1e-4) + 1e-4 * np.sum((x64 @ w64.T) ** 2)


def test_degenerate_calibration_data_is_stable():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    b = jnp.asarray(rng.normal(size=6), jnp.float32)
    x = inputs(rng, 2, 5).at[:, 4].set(3.0)  # 2 samples < 5 dims, one constant feature
    out = Whitened()(LayerProblem("fc", w, b, 2, jax.nn.relu, x), key=None)
    for a in (out.u, out.v, out.bias):
        assert np.all(np.isfinite(np.asarray(a)))
    # Rank 2 >= the centred data's rank 1: the calibration outputs are reproduced.
    assert out.function_error < 1e-6
    # Constant (here all-zero) inputs carry no information: fall back to the plain SVD.
    zero = Whitened()(LayerProblem("fc", w, None, 2, None, jnp.zeros((4, 5))), key=None)
    U, S, Vt = np.linalg.svd(np.asarray(w, np.float64))
    np.testing.assert_allclose(
        np.asarray(zero.u @ zero.v), (U[:, :2] * S[:2]) @ Vt[:2], atol=1e-4 * S[0]
    )
    assert zero.function_error == 0.0


def test_bad_ridge_raises():
    with pytest.raises(ValueError, match="Whitened ridge must be a finite number >= 0, got -0.1"):
        Whitened(ridge=-0.1)


def test_needs_calibration_inputs():
    with pytest.raises(ValueError, match="init 'whitened' needs calibration inputs for enc.fc1"):
        Whitened()(LayerProblem("enc.fc1", jnp.ones((3, 2)), None, 1), key=None)


def test_non_finite_inputs_raise():
    x = jnp.ones((4, 2)).at[1, 1].set(jnp.inf)
    with pytest.raises(ValueError, match="calibration inputs for enc.fc1 contain NaN/inf"):
        Whitened()(LayerProblem("enc.fc1", jnp.ones((3, 2)), None, 1, None, x), key=None)


def test_reuse_last_decomposes_a_shared_input_once():
    """q/k/v hand the fit one moment array: the decomposition runs once for it, again for
    another array (even an equal one) or other arguments."""
    calls = []
    square = reuse_last(lambda gram, delta: calls.append(delta) or gram * delta)
    gram = np.eye(3)
    for _ in range(3):
        np.testing.assert_array_equal(square(gram, 2.0), 2 * np.eye(3))
    square(gram, 3.0)
    square(np.eye(3), 3.0)
    assert calls == [2.0, 3.0, 3.0]
