"""The peers (plain SVD, SVD-LLM, ASVD) against float64 numpy re-derivations, through
lowrank.factorize with uniform ranks, ASVD's sensitivity search, and bad input."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank
from bench.peers import (
    ASVD,
    SVDLLM,
    PlainSVD,
    ScaledASVD,
    activation_scales,
    asvd_sensitivity,
    asvd_sensitivity_plan,
    svdllm_whitening,
    uniform_plan,
    uniform_ranks,
)


def problem(rng, m=12, n=8, samples=300, rank=3, bias=False):
    mix = rng.normal(size=(n, n)) * rng.uniform(0.1, 3.0, size=n)
    x = rng.normal(size=(samples, n)) @ mix + 0.3
    w = rng.normal(size=(m, n))
    b = rng.normal(size=m) if bias else None
    as32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)
    return lowrank.LayerProblem("blocks.0.fc", as32(w), as32(b), rank, None, as32(x))


def product(factors):
    return np.asarray(factors.u, np.float64) @ np.asarray(factors.v, np.float64)


def truncation(w, rank):
    U, S, Vt = np.linalg.svd(w)
    return (U[:, :rank] * S[:rank]) @ Vt[:rank]


def test_plain_svd_is_the_eckart_young_truncation():
    p = problem(np.random.default_rng(0), bias=True)
    out = PlainSVD()(p)
    w = np.asarray(p.weight, np.float64)
    np.testing.assert_allclose(product(out), truncation(w, 3), atol=1e-5 * np.abs(w).max())
    assert out.bias is p.bias  # kept as it is


def test_svdllm_is_the_whitened_optimum_when_the_gram_is_positive_definite():
    """min over rank-3 W' of ‖(W - W')Xᵀ‖, derived independently through the eigen-
    decomposition XᵀX = E Λ Eᵀ: W' = [W E Λ^½]_r Λ^-½ Eᵀ."""
    p = problem(np.random.default_rng(1), bias=True)
    out = SVDLLM()(p)
    w, x = np.asarray(p.weight, np.float64), np.asarray(p.inputs, np.float64)
    lam, e = np.linalg.eigh(x.T @ x)
    reference = truncation(w @ e * np.sqrt(lam), 3) / np.sqrt(lam) @ e.T
    np.testing.assert_allclose(product(out), reference, atol=1e-4 * np.abs(reference).max())
    assert out.bias is p.bias  # SVD-LLM leaves biases alone (no centring)
    # and it beats plain SVD on the calibration outputs
    err = lambda a: np.sum(((w - a) @ x.T) ** 2)
    assert err(product(out)) < err(truncation(w, 3))


def test_svdllm_falls_back_like_their_code_when_the_gram_is_singular():
    """Fewer rows than inputs: XᵀX is singular, so Cholesky fails (or gives a singular
    factor); SVD-LLM shifts it by (1e-6 - λ_min)·I."""
    rng = np.random.default_rng(2)
    p = problem(rng, m=10, n=8, samples=5, rank=2)
    out = SVDLLM()(p)
    w, x = np.asarray(p.weight, np.float64), np.asarray(p.inputs, np.float32)
    gram = (x.T @ x).astype(np.float64)
    shifted = gram + (1e-6 - np.linalg.eigvalsh(gram)[0]) * np.eye(8)
    s = np.linalg.cholesky(shifted)
    reference = truncation(w @ s, 2) @ np.linalg.inv(s)
    assert np.all(np.isfinite(product(out)))
    np.testing.assert_allclose(
        product(out), reference, rtol=1e-3, atol=1e-3 * np.abs(reference).max()
    )
    scale, inverse = svdllm_whitening(gram)
    np.testing.assert_allclose(scale @ inverse, np.eye(8), atol=1e-6)


def test_asvd_with_alpha_zero_is_plain_svd():
    p = problem(np.random.default_rng(3))
    w = np.asarray(p.weight, np.float64)
    np.testing.assert_allclose(
        product(ASVD(alpha=0)(p)), truncation(w, 3), atol=1e-5 * np.abs(w).max()
    )


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_asvd_scales_the_input_channels_by_mean_abs_activation(alpha):
    p = problem(np.random.default_rng(4), bias=True)
    out = ASVD(alpha=alpha)(p)
    w, x = np.asarray(p.weight, np.float64), np.asarray(p.inputs, np.float64)
    s = np.mean(np.abs(x), axis=0) ** alpha + 1e-6
    reference = truncation(w * s, 3) / s
    np.testing.assert_allclose(product(out), reference, atol=1e-5 * np.abs(reference).max())
    assert out.bias is p.bias


class TwoLayers(eqx.Module):
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, *, key):
        k1, k2 = jax.random.split(key)
        self.fc1 = eqx.nn.Linear(10, 24, key=k1)
        self.fc2 = eqx.nn.Linear(24, 6, key=k2)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


def test_peers_run_through_factorize_on_the_dense_inputs_with_uniform_ranks():
    model = TwoLayers(key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (64, 10)) * jnp.linspace(0.2, 2.0, 10)
    plan = uniform_plan(model, 0.5, target=["fc1", "fc2"])
    assert {lp.path: lp.rank for lp in plan.layers} == {
        "fc1": int(24 * 10 * 0.5 / 34),
        "fc2": int(6 * 24 * 0.5 / 30),
    }
    out = lowrank.factorize(model, plan=plan, init=SVDLLM(), calibration=x, sequential=False)
    # fc2 is fitted on the DENSE model's hidden activations, as SVD-LLM does.
    h = np.asarray(jax.nn.relu(jax.vmap(model.fc1)(x)), np.float64)
    s = np.linalg.cholesky(h.T @ h)
    w2 = np.asarray(model.fc2.weight, np.float64)
    reference = truncation(w2 @ s, plan["fc2"].rank) @ np.linalg.inv(s)
    np.testing.assert_allclose(
        np.asarray(out.fc2.u @ out.fc2.v, np.float64),
        reference,
        atol=2e-4 * np.abs(reference).max(),
    )
    np.testing.assert_array_equal(out.fc2.bias, model.fc2.bias)
    assert isinstance(model.fc2, eqx.nn.Linear)  # input model untouched
    plain = lowrank.factorize(model, plan=plan, init=PlainSVD())
    assert plain.fc1.u.shape == (24, plan["fc1"].rank)


def test_uniform_ranks_follow_the_papers_formula():
    model = TwoLayers(key=jax.random.key(0))
    assert uniform_ranks(model, 0.8, target=["fc1"]) == {"fc1": int(240 * 0.8 / 34)}


def test_activation_scales_measure_mean_abs_inputs():
    model = TwoLayers(key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (50, 10))
    scales = activation_scales(model, x, target=["fc1", "fc2"], alpha=0.5)
    h = np.asarray(jax.nn.relu(jax.vmap(model.fc1)(x)), np.float64)
    np.testing.assert_allclose(scales["fc2"], np.mean(np.abs(h), 0) ** 0.5 + 1e-6, rtol=1e-5)
    np.testing.assert_allclose(
        scales["fc1"], np.mean(np.abs(np.asarray(x, np.float64)), 0) ** 0.5 + 1e-6, rtol=1e-5
    )


def test_asvd_sensitivity_search_spends_the_budget_where_the_loss_says():
    """A loss that only cares about fc1: the search compresses fc2 to the smallest
    candidate and keeps as much of fc1 as the ratio allows."""
    model = TwoLayers(key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (50, 10))
    scales = activation_scales(model, x, target=["fc1", "fc2"])
    dense_h = jax.vmap(model.fc1)(x)

    def loss(m):  # error of fc1's output only
        return float(jnp.mean((jax.vmap(m.fc1)(x) - dense_h) ** 2))

    sensitivity = asvd_sensitivity(model, target=["fc1", "fc2"], scales=scales, loss=loss)
    plan = asvd_sensitivity_plan(model, 0.75, target=["fc1", "fc2"], sensitivity=sensitivity)
    assert set(sensitivity) == {"fc1", "fc2"} and len(sensitivity["fc1"]) == 6
    assert sensitivity["fc1"][0.4] > sensitivity["fc1"][0.9]
    assert plan["fc2"].rank == max(1, int(6 * 24 * 0.4) // 30)  # fc2 costs nothing: smallest
    # The largest k within 0.75: fc1 at 0.9 ((240·0.9 + 144·0.4) / 384 = 0.71); leaving
    # fc1 dense would keep (240 + 57.6) / 384 = 0.78.
    assert plan["fc1"].rank == int(240 * 0.9) // 34
    out = lowrank.factorize(model, plan=plan, init=ScaledASVD(scales))
    assert out.fc2.u.shape[1] == plan["fc2"].rank


def test_asvd_sensitivity_search_refuses_an_unreachable_ratio():
    model = TwoLayers(key=jax.random.key(0))
    scales = {"fc1": np.ones(10), "fc2": np.ones(24)}
    sensitivity = asvd_sensitivity(model, target=["fc1", "fc2"], scales=scales, loss=lambda m: 0.0)
    with pytest.raises(ValueError, match=r"cannot reach ratio 0.2.*add smaller candidates"):
        asvd_sensitivity_plan(model, 0.2, target=["fc1", "fc2"], sensitivity=sensitivity)
    with pytest.raises(ValueError, match=r"no sensitivity for \['fc2'\]; run asvd_sensitivity"):
        asvd_sensitivity_plan(model, 0.5, target=["fc1", "fc2"], sensitivity={"fc1": {0.4: 1.0}})
    with pytest.raises(ValueError, match=r"candidates must be ratios in \(0, 1\)"):
        asvd_sensitivity(model, target=["fc1"], scales=scales, loss=lambda m: 0.0, candidates=[1.0])


def test_bad_input_names_the_layer_or_argument_and_the_fix():
    p = problem(np.random.default_rng(5))
    no_data = lowrank.LayerProblem(p.path, p.weight, None, 3)
    with pytest.raises(
        ValueError, match=r"SVD-LLM needs calibration inputs for blocks\.0\.fc; pass calibration="
    ):
        SVDLLM()(no_data)
    with pytest.raises(ValueError, match=r"ASVD needs calibration inputs for blocks\.0\.fc"):
        ASVD()(no_data)
    with pytest.raises(ValueError, match=r"alpha must be a finite number >= 0 \(paper: 0\.5\)"):
        ASVD(alpha=-1)
    with pytest.raises(
        ValueError, match=r"no ASVD scale for blocks\.0\.fc; measure it with activation_scales"
    ):
        ScaledASVD({})(p)
    model = TwoLayers(key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\), got 1\.5"):
        uniform_ranks(model, 1.5, target=["fc1"])
    with pytest.raises(ValueError, match="needs calibration data"):
        lowrank.factorize(model, plan=uniform_plan(model, 0.5, target=["fc1"]), init=SVDLLM())
