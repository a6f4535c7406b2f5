"""The one-pass calibration engine: models that read layer attributes, depthwise convs
downstream of factorized layers, agreement with the multi-run reference, bad input."""

import gc
import weakref

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
        f64 = lambda m: jax.tree_util.tree_map(
            lambda a: jnp.asarray(a, jnp.float64) if eqx.is_inexact_array(a) else a, m
        )
        x64 = jnp.asarray(xs, jnp.float64)
        want = np.asarray(jax.vmap(f64(model))(x64))
        got = np.asarray(jax.vmap(f64(lowrank.densify(other)))(x64))
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize(
    "make, shape, rank, tied",
    [
        (TiedAutoencoder, (24,), 3, ["enc"]),
        (PointwiseDepthwise, (6, 5, 5), 2, None),
        (ScannedTransformer, (6, 8), 3, None),
    ],
    ids=["tied-head", "pointwise-depthwise-linear", "stacked-scan-transformer"],
)
@pytest.mark.parametrize("init", ["whitened", "nkp"])
def test_sequential_calibration_on_models_taps_could_not_handle(make, shape, rank, tied, init):
    """Exact at the weights' true rank; finite and better than spectral below it. A tied
    weight is fitted for its first use only (the encoder), so the quality comparison
    leaves it dense."""
    model = with_exact_rank(make(key=KEY), rank, key=KEY)
    xs = _anisotropic(64, shape)
    exact = lowrank.factorize(model, rank=rank, init=init, calibration=xs)
    assert any(
        isinstance(l, lowrank.LowRankLinear | lowrank.LowRankConv) for _, l in walk_layers(exact)
    )
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
            m = jax.tree_util.tree_map(
                lambda a: jnp.asarray(a, jnp.float64) if eqx.is_inexact_array(a) else a, m
            )
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
            path=path,
            weight=weight_matrix(layer),
            bias=None if layer.bias is None else jnp.asarray(layer.bias).reshape(-1),
            rank=rank,
            inputs=jnp.asarray(inputs),
            dense_inputs=None if dense_inputs is None else jnp.asarray(dense_inputs),
        )
        return init(problem, key=KEY)

    factors = reference.solve_layers(
        model, paths, xs, solve, sequential=True, max_rows=MAX_CALIBRATION_ROWS
    )
    merged = {p: reference.merged(layers[p], f) for p, f in factors.items()}
    merged |= reference.corrected_biases(model, factors, xs, max_rows=MAX_CALIBRATION_ROWS)
    return replace_layers(model, merged)


@pytest.mark.parametrize(
    "make, shape", [(CNN, (3, 8, 8)), (Block, (6, 32))], ids=["cnn", "attention"]
)
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
        (
            eqx.nn.MLP(32, 3, 16, 1, key=KEY),
            jnp.ones((64, 31)),
            r"calibration of shape \(64, 31\).*running the model on it failed.*leading batch axis",
        ),
        (
            eqx.nn.MLP(32, 3, 16, 1, key=KEY),
            jnp.ones((32,)),
            r"calibration of shape \(32,\).*one sample: add the axis with x\[None\]",
        ),
        (
            eqx.nn.MLP(32, 3, 16, 1, key=KEY),
            [jnp.ones(32), jnp.ones(32)],
            r"calibration must be an array with a leading batch axis or a callable fn\(model\), got a list; "
            r"stack the samples",
        ),
        (
            WithState(eqx.nn.Linear(8, 8, key=KEY)),
            jnp.ones((5, 8)),
            r"calibration of shape \(5, 8\).*fn\(model\) that runs the model, e\.g\. for models that also take state",
        ),
    ],
    ids=["wrong-width", "unbatched-sample", "list-of-samples", "model-with-state"],
)
def test_bad_calibration_is_named_with_the_fix(model, calibration, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        lowrank.factorize(model, rank=2, init="whitened", calibration=calibration)


@pytest.mark.parametrize(
    "example, pattern",
    [
        (
            jnp.ones((4, 32)),
            r"example of shape \(4, 32\).*ONE unbatched model input \(no batch axis",
        ),
        (3, r"example must be an array or a callable fn\(model\), got int 3"),
    ],
    ids=["batched-example", "python-int"],
)
def test_bad_example_is_named_with_the_fix(example, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        lowrank.plan(eqx.nn.MLP(32, 3, 16, 1, key=KEY), rank=2, example=example)


class TwoBranches(eqx.Module):
    """Two equal-sized layers on the two halves of the input."""

    a: eqx.nn.Linear
    b: eqx.nn.Linear

    def __init__(self, *, key):
        ka, kb = jax.random.split(key)
        self.a = eqx.nn.Linear(16, 16, use_bias=False, key=ka)
        self.b = eqx.nn.Linear(16, 16, use_bias=False, key=kb)

    def __call__(self, x):
        return self.a(x[:16]) + self.b(x[16:])


def test_data_aware_budget_follows_the_inputs_and_runs_the_data_twice():
    """Layer a's inputs span 2 directions, b's all 16: with the same weight spectra, the
    data-aware allocation gives a almost nothing and b the rest; weight spectra (the
    default) split evenly. One pass for the allocation, one for the fit."""
    model = TwoBranches(key=KEY)
    rng = np.random.default_rng(0)
    low_dim = rng.normal(size=(256, 2)) @ rng.normal(size=(2, 16))
    xs = jnp.asarray(np.concatenate([low_dim, rng.normal(size=(256, 16))], 1), jnp.float32)
    runs = []

    def calibrate(m):
        jax.debug.callback(lambda: runs.append(1))
        return jax.vmap(m)(xs)

    budget = lowrank.Budget(params=0.4, by="data")
    _, plan = lowrank.factorize(
        model, rank=budget, init="whitened", calibration=calibrate, return_plan=True
    )
    assert len(runs) == 2
    assert plan["a"].rank <= 2 < plan["b"].rank
    assert any("allocated from calibration data" in n for n in plan.notes)
    assert all(l.fit_seconds is not None and l.fit_seconds >= 0 for l in plan.factorized)
    # the default allocates from the weight spectra, calibration or not: one data pass
    runs.clear()
    _, default = lowrank.factorize(
        model,
        rank=lowrank.Budget(params=0.4),
        init="whitened",
        calibration=calibrate,
        return_plan=True,
    )
    assert len(runs) == 1
    assert any("weight spectra, not the calibration data" in n for n in default.notes)
    assert abs(default["a"].rank - default["b"].rank) <= 1


def test_uniform_budget_keeps_the_same_fraction_per_layer():
    model = eqx.nn.MLP(64, 32, 48, 2, key=KEY)
    plan = lowrank.plan(model, rank=lowrank.Budget(params=0.3, by="uniform"))
    for lp in plan.factorized:
        m, n = lp.matrix_shape
        assert lp.rank == max(1, int(0.3 * m * n / (m + n)))
    assert "by='uniform'" in plan.rule


def test_budget_by_is_checked():
    with pytest.raises(ValueError, match=r"Budget\(by='spectral'\): choose one of"):
        lowrank.Budget(params=0.5, by="spectral")
    with pytest.raises(
        ValueError,
        match=r"Budget\(by='data'\) allocates ranks from calibration data: pass calibration=",
    ):
        lowrank.plan(eqx.nn.MLP(8, 3, 16, 1, key=KEY), rank=lowrank.Budget(params=0.5, by="data"))


_SHARDED_RUN = """
import jax, jax.numpy as jnp, numpy as np, equinox as eqx, lowrank
from lowrank._calibrate import _sharded
assert len(jax.devices()) == {devices}
model = eqx.nn.MLP(12, 5, 24, 2, key=jax.random.key(0))
xs = jax.random.normal(jax.random.key(1), (64, 12))
assert len(_sharded(xs).sharding.device_set) == {devices}
low = lowrank.factorize(model, rank=3, init="whitened", calibration=xs)
np.save("{out}", np.concatenate([np.asarray(l.weight).ravel() for l in lowrank.densify(low).layers]))
"""


def test_calibration_is_sharded_over_local_devices_with_the_same_result(tmp_path):
    """4 forced CPU devices: the calibration batch is split over them, and the factors are
    those of the single-device run."""
    import os
    import subprocess
    import sys

    results = {}
    for devices in (1, 4):
        out = tmp_path / f"{devices}.npy"
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        code = _SHARDED_RUN.format(devices=devices, out=out)
        subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=os.getcwd())
        results[devices] = np.load(out)
    # float32 tolerance: the whitened fit's moments are float32 products of the rows
    scale = np.abs(results[1]).max()
    np.testing.assert_allclose(results[4], results[1], rtol=1e-4, atol=1e-4 * scale)


class HeavyHead(eqx.Module):
    """A factorized layer, then an expensive head with no Linear in it (like an LM's tied
    logits): the pass has no reason to compute the head."""

    fc: eqx.nn.Linear

    def __call__(self, x):
        h = self.fc(x)
        jax.debug.callback(lambda: HEAD_RUNS.append(1))
        return jnp.sin(h)


HEAD_RUNS = []


def test_the_pass_stops_after_the_last_watched_layer():
    model = HeavyHead(eqx.nn.Linear(12, 12, key=KEY))
    xs = jax.random.normal(KEY, (32, 12))
    HEAD_RUNS.clear()
    low = lowrank.factorize(model, rank=2, init="whitened", calibration=xs)
    assert isinstance(low.fc, lowrank.LowRankLinear) and HEAD_RUNS == []
    lowrank.factorize(model, rank=2, init="whitened", calibration=xs, sequential=False)
    assert HEAD_RUNS == [1]  # every call of a layer counts there: the pass runs to the end


class StackedStates(eqx.Module):
    """Residual layers whose `__call__` stacks every state and returns the last (as
    `hidden_states(x)[-1]` would)."""

    layers: list

    def __init__(self, n, *, key):
        self.layers = [eqx.nn.Linear(16, 16, key=k) for k in jax.random.split(key, n)]

    def __call__(self, x):
        states = [x]
        for layer in self.layers:
            states.append(states[-1] + jax.nn.relu(layer(states[-1])))
        return jnp.stack(states)[-1]


def test_values_read_only_after_the_last_watched_layer_are_not_kept(monkeypatch):
    """The stacked states are read only by the stack, after the last layer: the pass,
    which ends there, keeps none of them, however deep the model."""
    import lowrank._calibrate as calibrate

    xs = _anisotropic(64, (16,))
    held = []
    on_use = calibrate._Pass.on_weight_use

    def counting(self, scope, *args):
        top = self.scopes[0]
        held.append(sum(np.shape(x) == (64, 16) for x in top.dense.values()))
        return on_use(self, scope, *args)

    monkeypatch.setattr(calibrate._Pass, "on_weight_use", counting)
    lowrank.factorize(StackedStates(8, key=KEY), rank=4, init="whitened", calibration=xs)
    assert len(held) == 8 and max(held) <= 2, held  # the state and its copy for the layer


class Blocks(eqx.Module):
    """Transformer blocks applied in turn (a Python list: each block its own weights)."""

    blocks: list

    def __init__(self, n, *, key):
        self.blocks = [Block(16, 2, key=k) for k in jax.random.split(key, n)]

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_layers_reading_one_input_share_rows_and_moments(monkeypatch):
    """q/k/v read one normalized input: the pass hands them one array, and the whitened
    fit decomposes its moments once; the factors are those of separate fits."""
    import lowrank._whitened as whitened

    model = Blocks(2, key=KEY)
    xs = _anisotropic(8, (6, 16))
    calls = []
    moments = whitened.input_moments
    monkeypatch.setattr(
        whitened, "input_moments", lambda *a, **k: calls.append(1) or moments(*a, **k)
    )
    shared = lowrank.densify(lowrank.factorize(model, rank=3, init="whitened", calibration=xs))
    # per block: q/k/v (one input), out, fc1, fc2: 4 decompositions for 6 layers
    assert len(calls) == 2 * 4
    monkeypatch.setattr(whitened, "shared_input_moments", whitened.input_moments)
    separate = lowrank.densify(lowrank.factorize(model, rank=3, init="whitened", calibration=xs))
    assert len(calls) == 2 * 4 + 2 * 6
    for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(separate)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_identical_blocks_share_compiled_segments():
    """The data between watched weights is compiled once per distinct program: six
    blocks compile no more segments than three (first, middle and last block)."""
    import lowrank._paired_eval as paired

    counts = []
    for n in (3, 6):
        paired._SEGMENTS.clear()
        model = Blocks(n, key=KEY)
        lowrank.factorize(model, rank=3, init="whitened", calibration=_anisotropic(4, (6, 16)))
        counts.append(len(paired._SEGMENTS))
    assert counts[0] > 0 and counts[1] == counts[0]


class _RecordsRows(lowrank.Initializer):
    """Whitened, noting a weak reference to every layer's calibration rows."""

    calibration = "required"

    def __call__(self, problem, *, key):
        ROW_REFS.append(weakref.ref(problem.inputs))
        return lowrank.Whitened()(problem, key=key)


ROW_REFS = []


def test_no_calibration_rows_outlive_factorize():
    """Memory does not grow with the number of layers: once factorize returns, nothing
    (plan entries, caches) keeps any layer's calibration rows alive."""
    ROW_REFS.clear()
    model = Blocks(2, key=KEY)
    low, plan = lowrank.factorize(
        model, rank=3, init=_RecordsRows(), calibration=_anisotropic(4, (6, 16)), return_plan=True
    )
    gc.collect()
    assert len(ROW_REFS) == 12 and all(ref() is None for ref in ROW_REFS)
    assert all(l.function_error is not None for l in plan.factorized)
