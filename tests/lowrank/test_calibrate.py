"""The one-pass calibration engine: models that read layer attributes, depthwise convs
downstream of factorized layers, agreement with the multi-run reference, bad input."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

import lowrank
from lowrank._factorize import MAX_CALIBRATION_ROWS
from lowrank._initializers import LayerProblem
from lowrank._select import replace_layers, walk_layers, weight_matrix

from . import _reference_sequential as reference
from ._models import CNN, Block, ScannedTransformer, with_exact_rank

KEY = jax.random.key(0)


class TiedAutoencoder(eqx.Module):
    """Reads layer attributes in __call__: a tied decoder `enc.weight.T @ h` and a reshape
    to `mid.out_features` (what taps wrapping the layers could not serve)."""

    enc: eqx.nn.Linear
    mid: eqx.nn.Linear

    def __init__(self, *, key):
        k1, k2 = jax.random.split(key)
        self.enc = eqx.nn.Linear(24, 16, key=k1)
        self.mid = eqx.nn.Linear(16, 16, key=k2)

    def __call__(self, x):
        h = jax.nn.relu(self.enc(x))
        h = jax.nn.relu(self.mid(h)).reshape(self.mid.out_features)
        return self.enc.weight.T @ h


class PointwiseDepthwise(eqx.Module):
    """pointwise conv -> depthwise conv with a bias -> Linear (the MobileNet pattern)."""

    pw: eqx.nn.Conv2d
    dw: eqx.nn.Conv2d
    fc: eqx.nn.Linear

    def __init__(self, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.pw = eqx.nn.Conv2d(6, 12, 1, key=k1)
        self.dw = eqx.nn.Conv2d(12, 12, 3, padding=1, groups=12, key=k2)
        self.fc = eqx.nn.Linear(12 * 5 * 5, 7, key=k3)

    def __call__(self, x):
        h = jax.nn.relu(self.dw(jax.nn.relu(self.pw(x))))
        return self.fc(h.reshape(-1))


def _anisotropic(n: int, shape: tuple[int, ...]) -> jax.Array:
    """Real-data-like calibration inputs: correlated features with decaying variances
    (on isotropic inputs a data-aware fit has nothing to exploit over spectral)."""
    rng = np.random.default_rng(1)
    d = int(np.prod(shape))
    mix = np.linalg.qr(rng.normal(size=(d, d)))[0] / (1.0 + np.arange(d))[:, None]
    return jnp.asarray((rng.normal(size=(n, d)) @ mix * np.sqrt(d)).reshape(n, *shape), jnp.float32)


def _relative_error(model, other, xs) -> float:
    with enable_x64(True):
        f64 = lambda m: jax.tree_util.tree_map(  # noqa: E731
            lambda a: jnp.asarray(a, jnp.float64) if eqx.is_inexact_array(a) else a, m
        )
        x64 = jnp.asarray(xs, jnp.float64)
        want = np.asarray(jax.vmap(f64(model))(x64))
        got = np.asarray(jax.vmap(f64(lowrank.densify(other)))(x64))
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize(
    "make, shape, rank, tied",
    [(TiedAutoencoder, (24,), 3, ["enc"]), (PointwiseDepthwise, (6, 5, 5), 2, None),
     (ScannedTransformer, (6, 8), 3, None)],
    ids=["tied-head", "pointwise-depthwise-linear", "stacked-scan-transformer"],
)  # fmt: skip
@pytest.mark.parametrize("init", ["whitened", "nkp"])
def test_sequential_calibration_on_models_taps_could_not_handle(make, shape, rank, tied, init):
    """Exact at the weights' true rank; finite and better than spectral below it. A tied
    weight is fitted for its first use only (the encoder), so the quality comparison
    leaves it dense."""
    model = with_exact_rank(make(key=KEY), rank, key=KEY)
    xs = _anisotropic(64, shape)
    exact = lowrank.factorize(model, rank=rank, init=init, calibration=xs)
    assert any(isinstance(l, lowrank.LowRankLinear | lowrank.LowRankConv) for _, l in walk_layers(exact))
    assert _relative_error(model, exact, xs) < 1e-5
    low = lowrank.factorize(model, rank=1, init=init, calibration=xs, exclude=tied)
    spectral = lowrank.factorize(model, rank=1, init="spectral", exclude=tied)
    err_low, err_spectral = _relative_error(model, low, xs), _relative_error(model, spectral, xs)
    assert np.isfinite(err_low) and err_low < err_spectral


def test_depthwise_bias_downstream_is_corrected():
    """Only pw is factorized: the depthwise conv (dense, with a bias) gets its mean output
    back, per channel, on the calibration data."""
    model = PointwiseDepthwise(key=KEY)
    xs = jax.random.normal(jax.random.key(1), (32, 6, 5, 5))
    low = lowrank.factorize(model, rank=2, init="whitened", target=["pw"], calibration=xs)
    assert not np.allclose(low.dw.bias, model.dw.bias)

    def dw_mean(m):
        with enable_x64(True):
            x64 = jnp.asarray(xs, jnp.float64)
            m = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64) if eqx.is_inexact_array(a) else a, m)
            out = jax.vmap(lambda x: m.dw(jax.nn.relu(m.pw(x))))(x64)
            return np.asarray(out.mean((0, 2, 3)))

    np.testing.assert_allclose(dw_mean(low), dw_mean(model), atol=1e-4)


def _reference_factorize(model, rank, xs, init):
    """factorize(..., calibration=xs) by the multi-run reference, as a merged dense model."""
    layers = dict(walk_layers(model))
    paths = [p for p, l in layers.items() if getattr(l, "groups", 1) == 1]

    def solve(path, inputs, dense_inputs):
        layer = layers[path]
        problem = LayerProblem(
            path=path, weight=weight_matrix(layer),
            bias=None if layer.bias is None else jnp.asarray(layer.bias).reshape(-1), rank=rank,
            inputs=jnp.asarray(inputs),
            dense_inputs=None if dense_inputs is None else jnp.asarray(dense_inputs),
        )  # fmt: skip
        return init(problem, key=KEY)

    factors = reference.solve_layers(model, paths, xs, solve, sequential=True, max_rows=MAX_CALIBRATION_ROWS)
    merged = {p: reference.merged(layers[p], f) for p, f in factors.items()}
    merged |= reference.corrected_biases(model, factors, xs, max_rows=MAX_CALIBRATION_ROWS)
    return replace_layers(model, merged)


@pytest.mark.parametrize("make, shape", [(CNN, (3, 8, 8)), (Block, (6, 32))], ids=["cnn", "attention"])
def test_one_pass_matches_the_multi_run_reference(make, shape):
    model = make(key=KEY)
    xs = jax.random.normal(jax.random.key(2), (8, *shape))
    init = lowrank.Whitened()
    ours = lowrank.densify(lowrank.factorize(model, rank=2, init=init, calibration=xs))
    ref = _reference_factorize(model, 2, xs, init)
    for (path, a), (_, b) in zip(walk_layers(ours), walk_layers(ref)):
        np.testing.assert_allclose(a.weight, b.weight, rtol=2e-4, atol=2e-5, err_msg=path)
        if a.bias is not None:
            np.testing.assert_allclose(a.bias, b.bias, rtol=2e-4, atol=2e-5, err_msg=path)


def test_nan_in_calibration_is_named():
    model = eqx.nn.MLP(8, 3, 16, 2, key=KEY)
    xs = jnp.ones((10, 8)).at[3, 2].set(jnp.nan)
    with pytest.raises(ValueError, match=r"calibration contains NaN/inf \(1 of 80 values\)"):
        lowrank.factorize(model, rank=2, init="whitened", calibration=xs)


class WithState(eqx.Module):
    fc: eqx.nn.Linear

    def __call__(self, x, state):
        return self.fc(x), state


@pytest.mark.parametrize(
    "model, calibration, pattern",
    [
        (eqx.nn.MLP(32, 3, 16, 1, key=KEY), jnp.ones((64, 31)),
         r"calibration of shape \(64, 31\).*running the model on it failed.*leading batch axis"),
        (eqx.nn.MLP(32, 3, 16, 1, key=KEY), jnp.ones((32,)),
         r"calibration of shape \(32,\).*one sample: add the axis with x\[None\]"),
        (eqx.nn.MLP(32, 3, 16, 1, key=KEY), [jnp.ones(32), jnp.ones(32)],
         r"calibration must be an array with a leading batch axis or a callable fn\(model\), got a list; "
         r"stack the samples"),
        (WithState(eqx.nn.Linear(8, 8, key=KEY)), jnp.ones((5, 8)),
         r"calibration of shape \(5, 8\).*fn\(model\) that runs the model, e\.g\. for models that also take state"),
    ],
    ids=["wrong-width", "unbatched-sample", "list-of-samples", "model-with-state"],
)  # fmt: skip
def test_bad_calibration_is_named_with_the_fix(model, calibration, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        lowrank.factorize(model, rank=2, init="whitened", calibration=calibration)


@pytest.mark.parametrize(
    "example, pattern",
    [
        (jnp.ones((4, 32)), r"example of shape \(4, 32\).*ONE unbatched model input \(no batch axis"),
        (3, r"example must be an array or a callable fn\(model\), got int 3"),
    ],
    ids=["batched-example", "python-int"],
)
def test_bad_example_is_named_with_the_fix(example, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        lowrank.plan(eqx.nn.MLP(32, 3, 16, 1, key=KEY), rank=2, example=example)
