"""Stacked (scan-over-layers) layers: weights (L, out, in) from `eqx.filter_vmap`, run by
`lax.scan`, become stacked factors at one rank; plans, budgets, summaries, densify and
save/load count and rebuild the whole stack."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

import lowrank
from lowrank._rewrite import stacked_twin

from ._models import ScannedCNN, ScannedTransformer, with_exact_rank

KEY = jax.random.key(0)
L, T, D = 3, 5, 16  # ScannedTransformer defaults: depth, tokens, width
STACKED = ["blocks.attn.qkv", "blocks.attn.proj", "blocks.mlp.fc1", "blocks.mlp.fc2"]


def _float64_outputs(model, xs):
    """The dense model run in float64: the independent reference."""
    with enable_x64(True):
        model64 = jax.tree_util.tree_map(
            lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, model
        )
        return np.asarray(jax.vmap(model64)(jnp.asarray(xs, jnp.float64)))


def _relerr(got, want):
    want = np.asarray(want, np.float64)
    return np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)


def _stack(layer, *, depth=L, shape=(D, D), use_bias=True):
    """A stack of `depth` Linear layers (out, in) = shape, as eqx.filter_vmap builds it."""
    keys = jax.random.split(jax.random.key(3), depth)
    return eqx.filter_vmap(lambda k: layer(shape[1], shape[0], use_bias=use_bias, key=k))(keys)


@pytest.fixture(scope="module")
def transformer():
    return with_exact_rank(ScannedTransformer(key=KEY), 3, key=jax.random.key(1))


@pytest.fixture(scope="module")
def factorized(transformer):
    return lowrank.factorize(transformer, rank=3, return_plan=True)


def test_stacked_transformer_at_the_true_rank_reproduces_float64_outputs(transformer, factorized):
    low, plan = factorized
    assert {l.path for l in plan.factorized} == set(STACKED) | {"embed", "head"}
    fc1 = low.blocks.mlp["fc1"]
    assert isinstance(fc1, lowrank.LowRankLinear)
    assert (
        fc1.u.shape == (L, 4 * D, 3) and fc1.v.shape == (L, 3, D) and fc1.bias.shape == (L, 4 * D)
    )
    assert (fc1.rank, fc1.stack_shape, fc1.dense_shape) == (3, (L,), (4 * D, D))
    xs = jax.random.normal(jax.random.key(2), (2, T, 8))
    want = _float64_outputs(transformer, xs)
    assert _relerr(jax.vmap(low)(xs), want) < 1e-5
    assert _relerr(jax.jit(jax.vmap(low))(xs), want) < 1e-5
    assert all(l.weight_error < 1e-4 for l in plan.factorized)


def test_stacked_transformer_gradients_match_the_dense_model(transformer, factorized):
    low, _ = factorized
    xs = jax.random.normal(jax.random.key(2), (2, T, 8))
    loss = lambda m, x: jnp.sum(jnp.tanh(jax.vmap(m)(x)))
    want = jax.grad(lambda x: loss(transformer, x))(xs)
    got = jax.jit(jax.grad(lambda x: loss(low, x)))(xs)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    grads = eqx.filter_jit(eqx.filter_grad(loss))(low, xs).blocks.mlp["fc1"]
    assert grads.u.shape == (L, 4 * D, 3) and grads.v.shape == (L, 3, D)
    for g in (grads.u, grads.v):
        assert bool(jnp.all(jnp.isfinite(g)))
        assert all(float(jnp.abs(g[i]).max()) > 0 for i in range(L))  # every slice is trained


def test_densify_rebuilds_the_stacked_dense_layers(transformer, factorized):
    low, _ = factorized
    dense = lowrank.densify(low)
    assert jax.tree_util.tree_structure(dense) == jax.tree_util.tree_structure(transformer)
    fc1 = low.blocks.mlp["fc1"]
    want = np.einsum("lor,lri->loi", np.asarray(fc1.u, np.float64), np.asarray(fc1.v, np.float64))
    assert _relerr(dense.blocks.mlp["fc1"].weight, want) < 1e-6
    np.testing.assert_array_equal(dense.blocks.mlp["fc1"].bias, fc1.bias)
    xs = jax.random.normal(jax.random.key(2), (2, T, 8))
    assert _relerr(jax.vmap(dense)(xs), _float64_outputs(transformer, xs)) < 1e-5


def test_save_and_load_round_trip_a_stacked_model(transformer, factorized, tmp_path):
    low, plan = factorized
    lowrank.save(tmp_path / "model.eqx", low, plan)
    fresh = ScannedTransformer(key=jax.random.key(7))  # same constructor, other weights
    loaded = lowrank.load(tmp_path / "model.eqx", fresh)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(low)
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(low)):
        np.testing.assert_array_equal(a, b)


def test_stacked_convs_become_stacked_lowrank_convs():
    dense = with_exact_rank(ScannedCNN(key=KEY), 2, key=jax.random.key(1))
    low, plan = lowrank.factorize(dense, rank=2, target=["convs"], return_plan=True)
    conv = low.convs
    assert isinstance(conv, lowrank.LowRankConv)
    assert (
        conv.u.shape == (L, 8, 2) and conv.v.shape == (L, 2, 8, 3, 3) and conv.bias.shape == (L, 8)
    )
    assert plan["convs"].shape == (L, 8, 8, 3, 3) and plan["convs"].stack_dims == 1
    xs = jax.random.normal(jax.random.key(2), (2, 3, 6, 6))
    want = _float64_outputs(dense, xs)
    assert _relerr(jax.jit(jax.vmap(low))(xs), want) < 1e-5
    back = lowrank.densify(low)
    assert back.convs.weight.shape == (L, 8, 8, 3, 3) and back.convs.bias.shape == (L, 8, 1, 1)
    assert _relerr(jax.vmap(back)(xs), want) < 1e-5


@pytest.mark.parametrize("init", ["spectral", "nkp"])
def test_each_slice_is_factorized_as_its_own_layer(init):
    stacked = {"fc": _stack(eqx.nn.Linear, shape=(12, 10))}
    low = lowrank.factorize(stacked, rank=3, init=init)["fc"]
    for i in range(L):
        alone = {"fc": jax.tree_util.tree_map(lambda a, i=i: a[i], stacked["fc"])}
        want = lowrank.factorize(alone, rank=3, init=init)["fc"]
        np.testing.assert_allclose(low.u[i] @ low.v[i], want.weight, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(low.bias[i], want.bias, rtol=1e-5, atol=1e-6)


def test_random_init_draws_each_slice_independently():
    low = lowrank.factorize({"fc": _stack(eqx.nn.Linear)}, rank=3, init="random")["fc"]
    assert low.u.shape == (L, D, 3) and bool(jnp.all(jnp.isfinite(low.u)))
    assert not np.allclose(low.u[0], low.u[1])


class _Recorder:
    """An initializer that records the problems it sees and answers with zeros."""

    calibration = "never"

    def __init__(self, bad_shape=False):
        self.paths, self.bad_shape = [], bad_shape

    def __call__(self, problem, *, key):
        self.paths.append(problem.path)
        m, n = problem.weight.shape
        r = problem.rank + self.bad_shape
        return lowrank.Factors(jnp.zeros((m, r)), jnp.zeros((r, n)), problem.bias)


def test_initializer_sees_one_named_problem_per_slice():
    rec = _Recorder()
    model = {
        "blocks": {
            "fc": eqx.filter_vmap(eqx.filter_vmap(lambda k: eqx.nn.Linear(6, 8, key=k)))(
                jax.random.split(KEY, (2, 3))
            )
        }
    }
    low = lowrank.factorize(model, rank=2, init=rec)["blocks"]["fc"]
    assert rec.paths == [f"blocks.fc[{i},{j}]" for i in range(2) for j in range(3)]
    assert (
        low.u.shape == (2, 3, 8, 2) and low.v.shape == (2, 3, 2, 6) and low.bias.shape == (2, 3, 8)
    )
    plan = lowrank.plan(model, rank=2)
    assert plan["blocks.fc"].stack_dims == 2 and "[2][3]8x6" in str(plan)
    assert plan["blocks.fc"].params_after == 6 * (2 * (8 + 6) + 8)


def test_a_bad_slice_is_named_in_the_error():
    with pytest.raises(ValueError, match=r"returned u \(16, 4\).*for fc\[0\]; expected \(16, 3\)"):
        lowrank.factorize({"fc": _stack(eqx.nn.Linear)}, rank=3, init=_Recorder(bad_shape=True))


def test_plan_counts_the_whole_stack_in_closed_form(transformer):
    plan = lowrank.plan(transformer, rank=4, example=jnp.zeros((T, 8)))
    fc1 = plan["blocks.mlp.fc1"]
    m, n = 4 * D, D
    assert (fc1.shape, fc1.stack_dims, fc1.slices, fc1.positions) == ((L, m, n), 1, L, T)
    assert fc1.params_before == L * (m * n + m) and fc1.params_after == L * (4 * (m + n) + m)
    assert fc1.flops_before == L * T * (2 * m * n + m)
    assert fc1.flops_after == L * T * (2 * 4 * (m + n) + m)
    assert plan["embed"].positions == T and "[3]64x16" in str(plan)
    edited = plan.with_rank("blocks.mlp.fc1", 2)["blocks.mlp.fc1"]
    assert edited.params_before == fc1.params_before and edited.params_after == L * (
        2 * (m + n) + m
    )
    assert lowrank.Plan.from_json(plan.to_json()) == plan
    # the break-even guard and fractions are per slice: 13 * (64 + 16) >= 64 * 16
    with pytest.raises(ValueError, match="past break-even"):
        plan.with_rank("blocks.mlp.fc1", 13)
    assert lowrank.plan(transformer, rank=0.25)["blocks.mlp.fc1"].rank == 4  # of min(64, 16)


def test_energy_and_weight_error_use_the_slices_combined_spectra():
    # slice spectra (3, 1, 1, 1) and (2, 2): combined squared (13, 5, 1, 1) of 20
    fc = _stack(eqx.nn.Linear, depth=2, shape=(8, 8), use_bias=False)
    diag = np.zeros((2, 8, 8), np.float32)
    diag[0, range(4), range(4)] = [3, 1, 1, 1]
    diag[1, [0, 1], [1, 0]] = 2
    model = {"fc": eqx.tree_at(lambda l: l.weight, fc, jnp.asarray(diag))}
    plan = lowrank.plan(model, rank="energy:0.9")
    assert plan["fc"].rank == 2  # 18/20 kept; per slice 0 alone would need rank 3
    assert plan["fc"].weight_error == pytest.approx(np.sqrt(2 / 20), rel=1e-5)
    _, done = lowrank.factorize(model, plan=plan, return_plan=True)
    assert done["fc"].weight_error == pytest.approx(np.sqrt(2 / 20), rel=1e-4)


def test_budget_pays_for_every_slice():
    model = {"fc": _stack(eqx.nn.Linear, shape=(32, 32))}
    plan = lowrank.plan(model, rank=lowrank.Budget(params=0.3))
    # allowed 0.3 * 3 * (32*32 + 32) = 950.4; rank r costs 3 * (64 r + 32) -> r = 4
    assert plan["fc"].rank == 4
    assert plan.budget["achieved"] == pytest.approx(3 * (4 * 64 + 32) / (3 * (32 * 32 + 32)))


@pytest.mark.parametrize("kind", ["params", "flops"])
def test_budget_on_a_stacked_transformer_is_met(transformer, kind):
    budget = lowrank.Budget(**{kind: 0.3})
    plan = lowrank.plan(transformer, rank=budget, example=jnp.zeros((T, 8)))
    assert {l.path for l in plan.factorized} >= {"blocks.mlp.fc1", "blocks.mlp.fc2"}
    t = plan.totals()
    assert t[f"{kind}_after"] <= 0.3 * t[f"{kind}_before"]
    assert plan.budget["achieved"] > 0.2  # the budget is spent, not starved


def test_summary_counts_the_whole_stack(transformer, factorized):
    low, _ = factorized
    m, n = 4 * D, D
    dense_row = {l.path: l for l in lowrank.summary(transformer, example=jnp.zeros((T, 8))).layers}
    assert dense_row["blocks.mlp.fc1"].params == L * (m * n + m)
    assert dense_row["blocks.mlp.fc1"].flops == L * T * (2 * m * n + m)
    s = lowrank.summary(low, example=jnp.zeros((T, 8)))
    row = {l.path: l for l in s.layers}["blocks.mlp.fc1"]
    assert (row.shape, row.rank, row.stack_dims) == ((L, m, n), 3, 1)
    assert row.params == L * (3 * (m + n) + m) and row.flops == L * T * (2 * 3 * (m + n) + m)
    assert "[3]64x16" in str(s)
    n_params = sum(a.size for a in jax.tree_util.tree_leaves(eqx.filter(low, eqx.is_inexact_array)))
    assert s.total_params == n_params


def test_a_stacked_lowrank_layer_called_whole_says_to_slice_it(factorized):
    low, _ = factorized
    with pytest.raises(ValueError, match=r"stacked \(stack shape \(3,\)\).*lax\.scan"):
        low.blocks.mlp["fc1"](jnp.zeros(D))
    with pytest.raises(ValueError, match=r"stacked \(stack shape \(3,\)\).*filter_vmap"):
        lowrank.LowRankConv(
            jnp.zeros((3, 4, 2)), jnp.zeros((3, 2, 4, 3, 3)), stride=1, padding=1, dilation=1
        )(jnp.zeros((4, 5, 5)))


def test_mismatched_stacked_factors_are_rejected():
    with pytest.raises(
        ValueError, match=r"u \(\*stack, out, r\) and v \(\*stack, r, in\); got \(3, 4, 2\)"
    ):
        lowrank.LowRankLinear(jnp.zeros((3, 4, 2)), jnp.zeros((2, 2, 5)))
    with pytest.raises(
        ValueError,
        match=r"u \(\*stack, out, r\) and v \(\*stack, r, in, \*kernel\); got \(3, 4, 2\)",
    ):
        lowrank.LowRankConv(
            jnp.zeros((3, 4, 2)), jnp.zeros((2, 2, 4, 3, 3)), stride=1, padding=1, dilation=1
        )
    with pytest.raises(ValueError, match=r"bias must have shape \(3, 4\)"):
        lowrank.LowRankLinear(jnp.zeros((3, 4, 2)), jnp.zeros((3, 2, 5)), jnp.zeros(4))
    with pytest.raises(ValueError, match=r"stack of shape \(3,\) needs 3 Factors, got 1"):
        f = lowrank.Factors(jnp.zeros((D, 2)), jnp.zeros((2, D)), None)
        stacked_twin(_stack(eqx.nn.Linear), [f])


def test_positions_of_stacked_convs_are_counted_per_slice():
    """Each of the L convs run by the scan produces 6 x 6 outputs per example."""
    model = ScannedCNN(key=KEY)
    plan = lowrank.plan(model, rank=2, example=jnp.zeros((3, 6, 6)))
    assert plan["convs"].positions == 36 and plan["stem"].positions == 36
    rows = {l.path: l for l in lowrank.summary(model, example=jnp.zeros((3, 6, 6))).layers}
    assert rows["convs"].flops == 3 * 36 * (2 * 8 * 8 * 9 + 8)
