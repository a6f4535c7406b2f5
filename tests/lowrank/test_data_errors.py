"""The data-aware budget's error curves: by="output" against a float64 first-order
reference, and the allocation it gives a layer whose output the model damps."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank
from lowrank import _data_errors
from lowrank._data_errors import data_errors, probe_chunk, shrunk_eigenvalues

from ._models import ScannedTransformer

KEY = jax.random.key(0)


class Damped(eqx.Module):
    """Two layers reading the same input (b without a bias); the model scales b's output
    by `scale`."""

    a: eqx.nn.Linear
    b: eqx.nn.Linear
    scale: float = eqx.field(static=True)

    def __init__(self, scale: float, *, key):
        ka, kb = jax.random.split(key)
        self.a = eqx.nn.Linear(12, 10, key=ka)
        self.b = eqx.nn.Linear(12, 10, use_bias=False, key=kb)
        self.scale = scale

    def __call__(self, x):
        return jnp.tanh(self.a(x)) + self.scale * self.b(x)


def _ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """The Ledoit-Wolf shrunk second moment of the rows x, from its definition."""
    n_rows, n = x.shape
    c = x.T @ x / n_rows
    target = np.trace(c) / n
    spread = np.sum((c - target * np.eye(n)) ** 2)
    noise = sum(np.sum((np.outer(r, r) - c) ** 2) for r in x) / n_rows**2
    alpha = min(noise, spread) / spread
    return (1 - alpha) * c + alpha * target * np.eye(n)


def _first_order_reference(model: Damped, xs: np.ndarray) -> dict[str, np.ndarray]:
    """‖J ΔW_r‖² in float64 numpy: ΔW_r the W·S truncation error applied to the inputs
    (centred for a, which has a bias to take their mean), pushed through tanh' (layer a)
    or the scale (layer b), summed over samples."""
    x = np.asarray(xs, np.float64)
    curves = {}
    for name in ("a", "b"):
        centred = x - x.mean(0) if name == "a" else x
        eig, basis = np.linalg.eigh(_ledoit_wolf(centred))
        root = np.sqrt(eig)
        layer = getattr(model, name)
        w = np.asarray(layer.weight, np.float64)
        u, s, vt = np.linalg.svd((w @ basis) * root, full_matrices=False)
        if name == "a":
            pre = x @ w.T + np.asarray(layer.bias, np.float64)
            slope = 1 - np.tanh(pre) ** 2
        else:
            slope = np.full((len(x), w.shape[0]), model.scale)
        errors = []
        for r in range(1, len(s) + 1):
            delta_ws = (u[:, r:] * s[r:]) @ vt[r:]  # truncation error of W·S
            delta = (centred @ basis / root) @ delta_ws.T  # ΔW_r (x - x̄)
            errors.append(float(np.sum((slope * delta) ** 2)))
        curves[name] = np.asarray(errors)
    return curves


def test_output_errors_match_the_first_order_change_of_the_output():
    model = Damped(0.3, key=KEY)
    xs = jax.random.normal(jax.random.key(1), (100, 12)) * jnp.linspace(0.2, 2.0, 12)
    got = data_errors(
        model,
        {"a": model.a, "b": model.b},
        xs,  # 100 samples: two probe chunks of 64 and 36, whose effects add
        10_000,
        "output",
        ["a", "b"],
        key=jax.random.key(2),
        probes=512,
    )
    want = _first_order_reference(model, np.asarray(xs))
    for name in ("a", "b"):
        assert got[name].shape == want[name].shape
        assert got[name][-1] == 0.0  # full rank: no error
        # 512 probes: each point's relative noise is about sqrt(2 / 512) = 6%
        np.testing.assert_allclose(got[name][:-1], want[name][:-1], rtol=0.3)


def test_probe_chunks_bound_what_a_backward_pass_keeps(monkeypatch):
    """Per sample of 6 tokens, the measured layers' inputs and outputs are 6 x (8 + 16)
    (embed) + 6 x 3 slices x (16 + 64) (the stacked fc1) + 6 x (16 + 5) (head) = 1,710
    float32 values, 6,840 bytes."""
    model = ScannedTransformer(d_in=8, d=16, depth=3, d_out=5, key=KEY)
    layers = {p: lowrank.select(model).layers[p] for p in ("embed", "blocks.mlp.fc1", "head")}
    batch = jnp.zeros((200, 6, 8))
    assert probe_chunk(model, layers, batch) == _data_errors.PROBE_CHUNK  # 1 GiB: the cap
    for budget, chunk in ((7 * 6840, 7), (7 * 6840 + 6839, 7), (8 * 6840, 8), (100, 1)):
        monkeypatch.setattr(_data_errors, "PROBE_BYTES", budget)
        assert probe_chunk(model, layers, batch) == chunk


@pytest.mark.parametrize("rows", [8, 4000])
def test_shrunk_eigenvalues_match_ledoit_wolf(rows):
    """Few rows in 16 dimensions: strong shrinkage, a full-rank spectrum; many: almost
    none."""
    x = np.random.default_rng(0).normal(size=(rows, 16)) * np.linspace(0.1, 3.0, 16)
    eig = np.linalg.eigvalsh(x.T @ x / rows)
    got = shrunk_eigenvalues(x, np.zeros(16), eig)
    np.testing.assert_allclose(got, np.linalg.eigvalsh(_ledoit_wolf(x)), rtol=1e-9, atol=1e-12)
    if rows < 16:
        assert got.min() > 0.05 * got.max()
    else:
        np.testing.assert_allclose(got, eig, atol=0.01 * eig.max())


def test_output_budget_gives_a_damped_layer_fewer_ranks():
    """a and b see the same inputs, but the model scales b's output by 0.01: the whitened
    spectra ("data") cannot tell, the output probes can."""
    model = Damped(0.01, key=KEY)
    xs = jax.random.normal(jax.random.key(1), (128, 12))
    ranks = {}
    for by in ("data", "output"):
        _, plan = lowrank.factorize(
            model,
            rank=lowrank.Budget(params=0.55, by=by),
            init="whitened",
            calibration=xs,
            return_plan=True,
        )
        ranks[by] = (plan["a"].rank, plan["b"].rank)
        assert any("calibration" in note for note in plan.notes)
    assert abs(ranks["data"][0] - ranks["data"][1]) <= 2
    assert ranks["output"][0] > ranks["output"][1] + 2


def test_output_budget_needs_float_outputs():
    model = Damped(1.0, key=KEY)
    xs = jax.random.normal(jax.random.key(1), (16, 12))
    with pytest.raises(ValueError, match=r"by='output'.*returns int32"):
        lowrank.factorize(
            model,
            rank=lowrank.Budget(params=0.6, by="output"),
            init="whitened",
            calibration=lambda m: jnp.argmax(jax.vmap(m)(xs), -1),
        )


def test_output_budget_on_scan_stacked_layers_sums_the_slices():
    """Stacked (L, out, in) weights run by a scan: one curve per layer, the sum of its
    slices' curves, each slice's gradient read from its own row of the stack."""
    model = ScannedTransformer(key=KEY)
    xs = jax.random.normal(jax.random.key(1), (6, 4, 8))
    index = lowrank.select(model)
    paths = [e.path for e in index.entries]
    curves = data_errors(model, index.layers, xs, 10_000, "output", paths, key=KEY, probes=4)
    assert set(curves) == set(paths)
    for entry in index.entries:
        assert curves[entry.path].shape == (min(entry.shape[-2:]),)
        assert np.all(np.isfinite(curves[entry.path])) and curves[entry.path][-1] == 0.0
        assert curves[entry.path][0] > 0.0
    _, plan = lowrank.factorize(
        model,
        rank=lowrank.Budget(params=0.6, by="output"),
        init="whitened",
        calibration=xs,
        return_plan=True,
    )
    assert plan.factorized and 0.5 < plan.budget["achieved"] <= 0.6
