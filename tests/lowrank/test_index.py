"""The model index: one walk of the model, printable, read by plan/factorize/summary."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import lowrank
from lowrank import _index, _select
from lowrank._cost import fits

from ._models import ScannedTransformer, mlp

KEY = jax.random.key(0)


class Mixed(eqx.Module):
    mlp: eqx.nn.MLP
    depthwise: eqx.nn.Conv2d
    head: eqx.nn.Linear
    gru: eqx.nn.GRUCell

    def __init__(self, *, key):
        k = jax.random.split(key, 4)
        self.mlp = eqx.nn.MLP(6, 8, 16, 1, activation=jax.nn.gelu, key=k[0])
        self.depthwise = eqx.nn.Conv2d(4, 4, 3, groups=4, key=k[1])
        self.head = eqx.nn.Linear(8, 3, use_bias=False, key=k[2])
        self.gru = eqx.nn.GRUCell(4, 4, key=k[3])


def test_index_maps_paths_to_entries_and_prints_a_table():
    index = lowrank.select(Mixed(key=KEY), exclude=["gru"])
    assert list(index) == ["mlp.layers.0", "mlp.layers.1", "depthwise", "head"]
    first, last = index["mlp.layers.0"], index["mlp.layers.1"]
    assert (first.kind, first.shape, first.bias, first.activation) == (
        "Linear",
        (16, 6),
        True,
        jax.nn.gelu,
    )
    assert last.activation is _select.identity and index["head"].activation is None
    assert index["head"].bias is False and index["head"].skipped is None
    assert index["depthwise"].skipped.startswith("depthwise conv (groups=4)")
    assert "gru" in index.layers and "gru" not in index  # walked, excluded
    text = str(index)
    assert text.splitlines()[0] == "lowrank index: 4 of 5 layers selected"
    row = next(line for line in text.splitlines() if line.startswith("mlp.layers.0"))
    assert row.split() == ["mlp.layers.0", "Linear", "16x6", "yes", "gelu"]
    assert "none" in next(l for l in text.splitlines() if l.startswith("mlp.layers.1"))
    with pytest.raises(KeyError, match="no selected layer 'gru'"):
        index["gru"]


def test_index_shows_stacked_shapes():
    index = lowrank.select(ScannedTransformer(key=KEY), target=["mlp"])
    entry = index["blocks.mlp.fc1"]
    assert (entry.shape, entry.stack_dims) == ((3, 64, 16), 1)
    assert "[3]64x16" in str(index)


def _count_walks(monkeypatch) -> list:
    calls = []
    walk = _index.walk_model

    def counted(model):
        calls.append(1)
        return walk(model)

    monkeypatch.setattr(_index, "walk_model", counted)
    for name in ("walk_layers", "_walk"):  # the other walkers: selection must not use them
        monkeypatch.setattr(_select, name, lambda *a, _n=name: pytest.fail(f"{_n} called"))
    return calls


def test_factorize_walks_the_model_once_for_selection(monkeypatch):
    model = mlp(key=KEY)
    calibration = jax.random.normal(KEY, (32, 20))
    calls = _count_walks(monkeypatch)
    low, plan = lowrank.factorize(
        model,
        rank=lowrank.Budget(params=0.6),
        init="whitened",
        calibration=calibration,
        example=jnp.zeros(20),
        activations={"layers.2": None},
        return_plan=True,
    )
    assert len(calls) == 1
    lowrank.factorize(model, plan=plan, init="whitened", calibration=calibration)
    assert len(calls) == 2
    lowrank.summary(low, example=jnp.zeros(20))
    assert len(calls) == 3


def test_plan_entries_record_the_bias():
    model = {
        "a": eqx.nn.Linear(12, 10, key=KEY),
        "b": eqx.nn.Linear(12, 10, use_bias=False, key=KEY),
    }
    plan = lowrank.plan(model, rank=2)
    assert plan["a"].bias is True and plan["b"].bias is False
    # A hand-edited plan whose param counts disagree with the shape still costs the bias
    # it records (no more guessing a bias from the counts).
    plan.layers[1].params_before = 999
    edited = plan.with_rank("b", 3)["b"]
    assert edited.params_before == 120 and edited.params_after == 3 * 22
    assert lowrank.Plan.from_json(plan.to_json())["a"].bias is True


def test_fits_is_the_break_even_rule():
    for m, n in [(1, 1), (2, 3), (8, 8), (64, 16), (3, 100)]:
        for r in range(1, min(m, n) + 2):
            assert fits(m, n, r) == (r * (m + n) < m * n)
            if fits(m, n, r):
                assert r < min(m, n)
    plan = lowrank.plan({"fc": eqx.nn.Linear(8, 8, key=KEY)}, rank=4)
    assert plan["fc"].rank is None and plan["fc"].skipped.startswith(
        "break-even: rank 4 needs 64 >= 64"
    )
