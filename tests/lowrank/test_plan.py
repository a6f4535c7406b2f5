"""Rank rules, budgets, the break-even guard and every bad-input message."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lowrank

from ._models import CNN, mlp

KEY = jax.random.key(0)


class Wide(eqx.Module):
    """Layers with controlled spectra: fc1 has fast-decaying singular values, fc2 flat."""

    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self):
        self.fc1 = _with_spectrum(eqx.nn.Linear(64, 128, key=KEY), 0.5 ** np.arange(64))
        self.fc2 = _with_spectrum(eqx.nn.Linear(128, 64, key=KEY), np.ones(64))


def _with_spectrum(layer, s):
    rng = np.random.default_rng(0)
    m, n = layer.weight.shape
    q1, _ = np.linalg.qr(rng.normal(size=(m, len(s))))
    q2, _ = np.linalg.qr(rng.normal(size=(n, len(s))))
    return eqx.tree_at(lambda l: l.weight, layer, jnp.asarray((q1 * s) @ q2.T, jnp.float32))


def test_int_float_and_energy_rules():
    model = Wide()
    assert lowrank.plan(model, rank=5)["fc1"].rank == 5
    assert lowrank.plan(model, rank=0.25)["fc2"].rank == 16
    plan = lowrank.plan(model, rank="energy:0.9")
    s2 = 0.25 ** np.arange(64)
    assert plan["fc1"].rank == int(np.argmax(np.cumsum(s2) / s2.sum() >= 0.9)) + 1
    flat = lowrank.plan(model, rank="energy:0.3")["fc2"]
    assert flat.rank == int(np.ceil(0.3 * 64))  # flat spectrum: 20 of 64 directions


def test_energy_rank_on_flat_spectrum_hits_break_even_guard():
    plan = lowrank.plan(Wide(), rank="energy:0.9")  # 58 of 64 flat directions
    assert plan["fc2"].rank is None and "break-even" in plan["fc2"].skipped


def test_dict_rule_first_match_wins_and_unmatched_stay_dense():
    plan = lowrank.plan(mlp(key=KEY), rank={"layers.1": 0.25, r"layers\.[01]": 3})
    assert plan["layers.0"].rank == 3 and plan["layers.1"].rank == 8
    assert plan["layers.2"].rank is None and plan["layers.2"].skipped == "no rank rule matched"
    with pytest.raises(ValueError, match="rank pattern 'fc9' matches no selected layer"):
        lowrank.plan(mlp(key=KEY), rank={"fc9": 2})


def test_break_even_guard_keeps_layer_dense_and_says_why():
    model = eqx.nn.Linear(10, 12, key=KEY)  # break-even rank 120/22 = 5.45
    plan = lowrank.plan(model, rank=6)
    assert plan.layers[0].rank is None
    assert plan.layers[0].skipped == "break-even: rank 6 needs 132 >= 120 dense params"
    assert lowrank.plan(model, rank=5).layers[0].rank == 5


def test_global_rank_above_full_rank_leaves_layer_dense():
    plan = lowrank.plan(mlp(key=KEY), rank=12)
    assert plan["layers.2"].rank is None  # 7 x 32 head: full rank 7
    assert "rank 12 >= full rank 7" in plan["layers.2"].skipped


@pytest.mark.parametrize("fraction", [0.2, 0.35, 0.5])
@pytest.mark.parametrize("kind", ["params", "flops"])
def test_budget_is_met_and_reported(fraction, kind):
    model = CNN(key=KEY)
    plan = lowrank.plan(
        model, rank=lowrank.Budget(**{kind: fraction}), example=jnp.zeros((3, 16, 16))
    )
    t = plan.totals()
    achieved = t[f"{kind}_after"] / t[f"{kind}_before"]
    assert achieved <= fraction + 1e-9
    assert achieved > fraction - 0.1  # the budget is spent, not wasted
    assert plan.budget["kind"] == kind and plan.budget["asked"] == fraction
    assert plan.budget["achieved"] == pytest.approx(achieved)
    assert f"budget: {kind} asked" in str(plan)


def test_budget_prefers_the_layer_with_the_decaying_spectrum():
    plan = lowrank.plan(Wide(), rank=lowrank.Budget(params=0.3))
    assert plan["fc1"].weight_error < plan["fc2"].weight_error
    assert plan["fc1"].rank < 20  # 0.5^k decays: a few directions carry all the energy


def test_budget_does_not_starve_a_wide_layer_with_a_flat_spectrum():
    class TwoFlat(eqx.Module):
        wide: eqx.nn.Linear
        narrow: eqx.nn.Linear

        def __init__(self):
            self.wide = _with_spectrum(eqx.nn.Linear(1024, 128, key=KEY), np.ones(128))
            self.narrow = _with_spectrum(eqx.nn.Linear(64, 64, key=KEY), np.ones(64))

    plan = lowrank.plan(TwoFlat(), rank=lowrank.Budget(params=0.3))
    # The sum-of-errors greedy gave `wide` rank 1 here; log-retention spreads the budget.
    assert plan["wide"].rank >= 16
    assert plan["narrow"].rank is None or plan["narrow"].rank >= 8


def test_flops_budget_needs_conv_output_sizes():
    with pytest.raises(
        ValueError, match=r"Budget\(flops=...\) needs conv output sizes.*pass example="
    ):
        lowrank.plan(CNN(key=KEY), rank=lowrank.Budget(flops=0.5))


def test_unreachable_budget_says_what_is_reachable():
    with pytest.raises(
        ValueError, match=r"Budget\(params=0.01\) cannot be met: rank 1 .* raise the budget above"
    ):
        lowrank.plan(CNN(key=KEY), rank=lowrank.Budget(params=0.01))


@pytest.mark.parametrize(
    "rank,error,match",
    [
        (0, ValueError, r"rank=0 must be a positive int"),
        (-3, ValueError, r"rank=-3 must be a positive int"),
        (1.5, ValueError, r"rank=1.5 is a fraction of full rank and must lie in \(0, 1\]"),
        (0.0, ValueError, r"must lie in \(0, 1\]"),
        ("energy:1.2", ValueError, r"the energy fraction must lie in \(0, 1\]"),
        ("top:3", ValueError, r"string ranks look like 'energy:0.9'"),
        (True, TypeError, "rank must be an int"),
        ([3], TypeError, "rank must be an int, a float in"),
        ({"layers.0": 0}, ValueError, r"rank\['layers.0'\]=0 must be a positive int"),
    ],
)
def test_bad_rank_rules(rank, error, match):
    with pytest.raises(error, match=match):
        lowrank.factorize(mlp(key=KEY), rank=rank)


def test_explicitly_targeted_rank_above_full_rank_names_layer_and_fix():
    with pytest.raises(
        ValueError, match=r"rank 40 > min\(32, 20\) for layers.0; choose rank <= 20"
    ):
        lowrank.factorize(mlp(key=KEY), rank=40, target=["layers.0"])


def test_bad_budgets():
    with pytest.raises(ValueError, match="exactly one of params= or flops="):
        lowrank.Budget(params=0.3, flops=0.3)
    with pytest.raises(
        ValueError, match=r"Budget\(params=1.5\): the fraction must be a number in \(0, 1\]"
    ):
        lowrank.Budget(params=1.5)


def test_unknown_init_lists_available():
    with pytest.raises(ValueError, match=r"unknown init 'svd'; available: .*spectral"):
        lowrank.factorize(mlp(key=KEY), rank=2, init="svd")


def test_missing_rank_and_conflicting_arguments():
    with pytest.raises(ValueError, match="factorize needs rank="):
        lowrank.factorize(mlp(key=KEY))
    plan = lowrank.plan(mlp(key=KEY), rank=2)
    with pytest.raises(ValueError, match="pass either plan= or rank="):
        lowrank.factorize(mlp(key=KEY), plan=plan, rank=3)


def test_non_finite_weights_name_the_layer():
    model = mlp(key=KEY)
    bad = eqx.tree_at(
        lambda m: m.layers[1].weight, model, model.layers[1].weight.at[0, 0].set(jnp.nan)
    )
    with pytest.raises(ValueError, match="layer layers.1 has non-finite weights"):
        lowrank.factorize(bad, rank=2)


def test_calibration_mismatch_with_init_is_an_error():
    with pytest.raises(ValueError, match="init 'spectral' does not use calibration data"):
        lowrank.factorize(mlp(key=KEY), rank=2, calibration=jnp.zeros((4, 20)))


def test_plan_table_lists_every_column():
    text = str(lowrank.plan(CNN(key=KEY), rank=2))
    for column in (
        "path",
        "type",
        "shape",
        "rank",
        "params",
        "FLOPs",
        "init",
        "w-err",
        "f-err",
        "note",
    ):
        assert column in text
    assert "convs.1" in text and "TOTAL" in text


@given(m=st.integers(2, 40), n=st.integers(2, 40), r=st.integers(1, 40), bias=st.booleans())
def test_plan_counts_follow_closed_form(m, n, r, bias):
    layer = eqx.nn.Linear(n, m, use_bias=bias, key=KEY)
    lp = lowrank.plan(layer, rank=r).layers[0]
    b = m if bias else 0
    assert lp.params_before == m * n + b
    if r < min(m, n) and r * (m + n) < m * n:
        assert lp.rank == r
        assert lp.params_after == r * (m + n) + b
        assert lp.flops_after == 2 * r * (m + n) + b
    else:
        assert lp.rank is None and lp.params_after == lp.params_before


def test_budget_floor_keeps_layers_where_dense_beats_rank_one():
    model = [eqx.nn.Linear(5, 1, key=KEY), eqx.nn.Linear(64, 64, key=KEY)]
    plan = lowrank.plan(model, rank=lowrank.Budget(params=0.5))
    assert plan["0"].rank is None and plan["1"].rank is not None
    assert plan.budget["achieved"] <= 0.5


@pytest.mark.parametrize(
    "rank,want",
    [
        (np.int64(4), 4),
        (jnp.array(4), 4),
        (np.float32(0.25), 8),
        (jnp.array(0.25), 8),
        ({"layers.1": np.int32(3)}, 3),
        ({"layers": jnp.array(0.125)}, 4),
    ],
)
def test_numpy_and_jax_scalar_ranks_are_accepted(rank, want):
    assert lowrank.plan(mlp(key=KEY), rank=rank)["layers.1"].rank == want


def test_numpy_scalars_in_budgets_and_edits_bools_rejected():
    budget = lowrank.Budget(params=np.float32(0.5))
    assert (
        isinstance(budget.params, float)
        and lowrank.plan(mlp(key=KEY), rank=budget).budget["asked"] == 0.5
    )
    plan = lowrank.plan(mlp(key=KEY), rank=2).with_rank("layers.1", np.int64(5))
    assert plan["layers.1"].rank == 5 and type(plan["layers.1"].rank) is int
    assert lowrank.Plan.from_json(plan.to_json()) == plan
    with pytest.raises(TypeError, match="rank must be an int"):
        lowrank.plan(mlp(key=KEY), rank=np.bool_(True))
    with pytest.raises(TypeError, match="rank must be an int"):
        lowrank.plan(mlp(key=KEY), rank=jnp.array(True))
    with pytest.raises(ValueError, match=r"the fraction must be a number in \(0, 1\]"):
        lowrank.Budget(flops=np.bool_(True))


def test_empty_rank_dict_is_an_error():
    with pytest.raises(ValueError, match=r"rank=\{\} has no rules: give \{pattern: rank\} entries"):
        lowrank.plan(mlp(key=KEY), rank={})


def test_integer_weights_are_rejected_naming_layer_and_dtype():
    model = mlp(key=KEY)
    ints = eqx.tree_at(
        lambda m: m.layers[1].weight,
        model,
        jnp.round(model.layers[1].weight * 100).astype(jnp.int32),
    )
    with pytest.raises(
        ValueError,
        match=r"layer layers.1 has int32 weights; .*cast the model to float .* exclude=\['layers.1'\]",
    ):
        lowrank.factorize(ints, rank=2)
    plan = lowrank.plan(model, rank=2)
    with pytest.raises(ValueError, match="layer layers.1 has int32 weights"):
        lowrank.factorize(ints, plan=plan)
    assert lowrank.plan(ints, rank=2, exclude=["layers.1"])["layers.0"].rank == 2


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda d: d["layers"][0].update(rank="abc"),
            r"plan layer 0 \('layers.0'\) field 'rank' must be int or null, got 'abc'",
        ),
        (
            lambda d: d["layers"][1].pop("shape"),
            r"plan layer 1 \('layers.1'\) has unknown fields \[\] / lacks fields \['shape'\]",
        ),
        (
            lambda d: d["layers"][2].update(colour=1),
            r"plan layer 2 \('layers.2'\) has unknown fields \['colour'\]",
        ),
        (
            lambda d: d["layers"][0].update(shape=[32, -1]),
            r"field 'shape' must be a list of positive ints",
        ),
        (
            lambda d: d["layers"][0].update(factorizable=1),
            r"field 'factorizable' must be bool, got 1",
        ),
        (
            lambda d: d["layers"][0].update(params_before=True),
            r"field 'params_before' must be int, got True",
        ),
        (lambda d: d.update(layers={}), r"plan 'layers' must be a list"),
        (lambda d: d.update(extra=1), r"not a lowrank plan: keys \['budget', 'extra'"),
        (lambda d: d.update(budget={"kind": "params"}), r"plan 'budget' must be null or \{'kind'"),
        (
            lambda d: d["layers"][0].update(weight_error="0.1"),
            r"field 'weight_error' must be float or null, got '0.1'",
        ),
    ],
)
def test_edited_plan_json_names_the_broken_field(edit, match):
    import json

    data = json.loads(lowrank.plan(mlp(key=KEY), rank=2).to_json())
    edit(data)
    with pytest.raises(ValueError, match=match):
        lowrank.Plan.from_json(json.dumps(data))


def test_truncated_plan_json_is_reported_as_invalid_json():
    text = lowrank.plan(mlp(key=KEY), rank=2).to_json()
    with pytest.raises(ValueError, match=r"not a lowrank plan: invalid JSON \(.* line \d+ column"):
        lowrank.Plan.from_json(text[: len(text) // 2])
