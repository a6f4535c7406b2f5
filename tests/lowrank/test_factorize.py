"""factorize / densify end to end: exact reconstruction, counts, gradients, immutability."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

import lowrank

from ._models import CNN, Block, mlp, with_exact_rank

KEY = jax.random.key(0)


def _float64_outputs(model, xs):
    """The dense model run in float64: the independent reference."""
    with enable_x64(True):
        model64 = jax.tree_util.tree_map(
            lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, model
        )
        return np.asarray(jax.vmap(model64)(jnp.asarray(xs, jnp.float64)))


def _relerr(got, want):
    return np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)


@pytest.mark.parametrize(
    "build,input_shape,rank",
    [
        (mlp, (20,), 4),
        (lambda key: CNN(key=key), (3, 12, 12), 3),
        (lambda key: Block(key=key), (6, 32), 5),
    ],
    ids=["mlp", "cnn", "transformer-block"],
)
def test_spectral_at_the_true_rank_reproduces_outputs(build, input_shape, rank):
    dense = with_exact_rank(build(key=KEY), rank, key=jax.random.key(1))
    low, plan = lowrank.factorize(dense, rank=rank, return_plan=True)
    assert len(plan.factorized) >= 3
    xs = jax.random.normal(jax.random.key(2), (4, *input_shape))
    want = _float64_outputs(dense, xs)
    assert _relerr(jax.vmap(low)(xs), want) < 1e-5
    assert _relerr(jax.vmap(lowrank.densify(low))(xs), want) < 1e-5
    assert all(l.weight_error < 1e-4 for l in plan.factorized)


def test_transformer_block_attention_projections_are_found():
    plan = lowrank.plan(Block(key=KEY), rank=4)
    paths = {l.path for l in plan.factorized}
    assert {"attn.query_proj", "attn.key_proj", "attn.value_proj", "attn.output_proj"} <= paths
    assert {"mlp.fc1", "mlp.fc2"} <= paths


def _n_params(model):
    return sum(a.size for a in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array)))


def test_parameter_counts_equal_closed_form():
    model = CNN(key=KEY)
    r = 4
    low = lowrank.factorize(model, rank=r)
    # conv0: 3->16 (3x3), conv1: 16->24, conv2: 24->24 no bias, head 24->10
    expected = (
        r * (16 + 3 * 9)
        + 16
        + r * (24 + 16 * 9)
        + 24
        + r * (24 + 24 * 9)
        + 24 * 10
        + 10  # head: 4*(24+10)=136 >= 240? no: 136 < 240, so factorized
    )
    expected += r * (24 + 10) - 24 * 10
    assert _n_params(low) == expected
    assert lowrank.summary(low).total_params == expected


def test_gradients_flow_to_factors():
    low = lowrank.factorize(mlp(key=KEY), rank=3)
    xs = jax.random.normal(KEY, (8, 20))
    grads = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(xs) ** 2))(low)
    for layer in grads.layers:
        if isinstance(layer, lowrank.LowRankLinear):
            assert float(jnp.abs(layer.u).max()) > 0 and float(jnp.abs(layer.v).max()) > 0
            assert bool(jnp.all(jnp.isfinite(layer.u)) & jnp.all(jnp.isfinite(layer.v)))


def test_input_model_is_never_mutated():
    model = CNN(key=KEY)
    before = [np.array(a) for a in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))]
    treedef = jax.tree_util.tree_structure(model)
    lowrank.factorize(model, rank=lowrank.Budget(params=0.4))
    lowrank.factorize(model, rank=2, init="random", key=KEY)
    after = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))
    assert jax.tree_util.tree_structure(model) == treedef
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert all(isinstance(c, eqx.nn.Conv2d) for c in model.convs)


def test_densify_returns_plain_equinox_layers():
    low = lowrank.factorize(CNN(key=KEY), rank=2)
    dense = lowrank.densify(low)
    assert all(type(c) is eqx.nn.Conv2d for c in dense.convs)
    assert type(dense.head) is eqx.nn.Linear
    assert dense.convs[0].bias.shape == (16, 1, 1)
    x = jax.random.normal(KEY, (3, 10, 10))
    np.testing.assert_allclose(dense(x), low(x), rtol=1e-5, atol=1e-6)


def test_plan_round_trips_through_json_and_edits_reapply():
    model = mlp(key=KEY)
    plan = lowrank.plan(model, rank=0.25)
    again = lowrank.Plan.from_json(plan.to_json())
    assert again == plan
    edited = again.with_rank("layers.1", 2)
    low = lowrank.factorize(model, plan=edited)
    assert low.layers[1].rank == 2 and low.layers[0].rank == plan["layers.0"].rank
    with pytest.raises(ValueError, match=r"rank 99 > min\(32, 32\) for layers.1"):
        again.with_rank("layers.1", 99)


def test_plan_from_another_model_is_rejected():
    plan = lowrank.plan(mlp(key=KEY), rank=2)
    with pytest.raises(ValueError, match="plan layer layers.0 is not in this model"):
        lowrank.factorize(CNN(key=KEY), plan=plan)
    other = eqx.nn.MLP(21, 7, 32, 2, key=KEY)
    with pytest.raises(ValueError, match=r"plan layer layers.0 has shape \(32, 20\).*re-plan"):
        lowrank.factorize(other, plan=plan)


def test_random_init_matches_dense_entry_variance():
    dense = eqx.nn.Linear(256, 512, key=KEY)
    low = lowrank.factorize(dense, rank=64, init="random", key=KEY)
    want = float(np.var(np.asarray(dense.weight, np.float64)))
    got = float(np.var(np.asarray(low.u, np.float64) @ np.asarray(low.v, np.float64)))
    assert abs(got / want - 1) < 0.1
    assert not np.allclose(np.asarray(low.weight), np.asarray(dense.weight), atol=1e-3)


def test_custom_initializer_registers_and_plugs_in():
    class Half:
        calibration = "never"

        def __call__(self, problem, *, key):
            u, v = lowrank.Spectral()(problem, key=key)[:2]
            return lowrank.Factors(u * 0.5, v, problem.bias)

    lowrank.register_initializer("half-spectral-test", Half())
    model = mlp(key=KEY)
    a = lowrank.factorize(model, rank=3, init="half-spectral-test")
    b = lowrank.factorize(model, rank=3, init="spectral")
    np.testing.assert_allclose(a.layers[0].weight, 0.5 * b.layers[0].weight, rtol=1e-5, atol=1e-6)
    assert "half-spectral-test" in lowrank.available_initializers()


def test_calibration_records_each_layers_own_inputs():
    """A data-aware init sees conv patches whose product with W is the conv output."""
    seen = {}

    class Recorder:
        calibration = "required"

        def __call__(self, problem, *, key):
            seen[problem.path] = problem
            return lowrank.Spectral()(problem, key=key)

    model = CNN(key=KEY)
    xs = jax.random.normal(KEY, (2, 3, 8, 8))
    lowrank.factorize(model, rank=2, init=Recorder(), calibration=xs, sequential=False)
    p = seen["convs.1"]
    assert p.dense_inputs is None  # not sequential: every layer sees the dense model's inputs
    h0 = jax.vmap(lambda x: jax.nn.relu(model.convs[0](x)))(xs)
    conv_out = jax.vmap(model.convs[1])(h0) - model.convs[1].bias  # bias is (out, 1, 1)
    rows = np.asarray(p.inputs, np.float64) @ np.asarray(p.weight, np.float64).T
    want = np.moveaxis(np.asarray(conv_out), 1, -1).reshape(-1, 24)  # rows in (N, H, W) order
    np.testing.assert_allclose(rows, want, rtol=1e-4, atol=1e-4)
    assert seen["head"].inputs.shape == (2, 24)
    assert p.bias.shape == (24,)


def test_mlp_activation_is_passed_to_initializers():
    seen = {}

    class Recorder:
        calibration = "never"

        def __call__(self, problem, *, key):
            seen[problem.path] = problem.activation
            return lowrank.Spectral()(problem, key=key)

    model = eqx.nn.MLP(20, 7, 32, 2, activation=jax.nn.gelu, key=KEY)
    lowrank.factorize(model, rank=3, init=Recorder())
    assert seen["layers.0"] is jax.nn.gelu and seen["layers.1"] is jax.nn.gelu
    x = jnp.linspace(-2.0, 2.0, 5)
    np.testing.assert_array_equal(seen["layers.2"](x), x)  # known: no activation after the head
    lowrank.factorize(CNN(key=KEY), rank=2, init=Recorder())
    assert seen["convs.0"] is None  # unknown in a custom module
    lowrank.factorize(
        CNN(key=KEY), rank=2, init=Recorder(), activations={r"convs\.\d": jax.nn.relu, "head": None}
    )
    assert seen["convs.0"] is jax.nn.relu and seen["convs.2"] is jax.nn.relu
    np.testing.assert_array_equal(seen["head"](x), x)
    with pytest.raises(ValueError, match="activations pattern 'fc' matches no layer"):
        lowrank.factorize(CNN(key=KEY), rank=2, activations={"fc": None})
    with pytest.raises(TypeError, match=r"activations\['head'\] must be a function or None"):
        lowrank.factorize(CNN(key=KEY), rank=2, activations={"head": "relu"})


def test_whole_model_agrees_between_pallas_and_xla_kernels():
    low = lowrank.factorize(with_exact_rank(Block(key=KEY), 4, key=KEY), rank=4)
    xs = jax.random.normal(jax.random.key(3), (2, 5, 32))
    xla = jax.vmap(lowrank.with_kernels(low, impl="xla"))(xs)
    pallas = jax.vmap(lowrank.with_kernels(low, impl="pallas"))(xs)
    assert lowrank.with_kernels(low, impl="pallas").mlp["fc1"].impl == "pallas"
    np.testing.assert_allclose(pallas, xla, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="impl must be one of"):
        lowrank.with_kernels(low, impl="cuda")


class _TokenMLP(eqx.Module):
    """A conv patch embedding, then a Linear vmapped over the 16 tokens: the ViT pattern."""

    embed: eqx.nn.Conv2d
    fc: eqx.nn.Linear

    def __init__(self, *, key):
        k1, k2 = jax.random.split(key)
        self.embed = eqx.nn.Conv2d(3, 32, 4, stride=4, key=k1)
        self.fc = eqx.nn.Linear(32, 64, key=k2)

    def __call__(self, x):
        tokens = self.embed(x).reshape(32, -1).T  # (16, 32)
        return jax.vmap(self.fc)(tokens).mean(0)


def test_flops_count_every_token_a_vmapped_linear_sees():
    model = _TokenMLP(key=KEY)
    plan = lowrank.plan(model, rank=4, example=jnp.zeros((3, 16, 16)))
    assert plan["fc"].positions == 16 and plan["embed"].positions == 16
    assert plan["fc"].flops_before == 16 * (2 * 64 * 32 + 64)
    low = lowrank.factorize(model, plan=plan)
    s = lowrank.summary(low, example=jnp.zeros((3, 16, 16)))
    assert {l.path: l.flops for l in s.layers}["fc"] == 16 * (2 * 4 * (64 + 32) + 64)


def test_calibration_sees_every_token_in_one_host_call_per_batch():
    seen = {}

    class Recorder:
        calibration = "required"

        def __call__(self, problem, *, key):
            seen[problem.path] = np.asarray(problem.inputs)
            return lowrank.Spectral()(problem, key=key)

    model = _TokenMLP(key=KEY)
    xs = jax.random.normal(KEY, (5, 3, 16, 16))
    lowrank.factorize(model, rank=2, init=Recorder(), calibration=xs, sequential=False)
    tokens = jax.vmap(lambda x: model.embed(x).reshape(32, -1).T)(xs).reshape(-1, 32)
    np.testing.assert_allclose(
        np.sort(seen["fc"], 0), np.sort(np.asarray(tokens), 0), rtol=1e-5, atol=1e-5
    )
    # a callable calibration with differently sized images works too
    lowrank.factorize(
        model,
        rank=2,
        init=Recorder(),
        calibration=lambda m: (jax.vmap(m.embed)(xs), jax.vmap(m.embed)(xs[:, :, :8, :12])),
        target=["embed"],
        sequential=False,
    )
    assert seen["embed"].shape == (5 * 16 + 5 * 6, 48)  # both calls' patches
    with pytest.raises(ValueError, match=r"calibration never ran the matmul of layers \['fc'\]"):
        lowrank.factorize(
            model, rank=2, init=Recorder(), calibration=lambda m: jax.vmap(m.embed)(xs)
        )


def test_edited_plans_are_checked_against_the_model():
    class WithDepthwise(eqx.Module):
        dw: eqx.nn.Conv2d
        fc: eqx.nn.Linear

        def __init__(self):
            self.dw = eqx.nn.Conv2d(8, 8, 3, groups=8, key=KEY)
            self.fc = eqx.nn.Linear(10, 12, key=KEY)

    plan = lowrank.plan(WithDepthwise(), rank=2)
    with pytest.raises(
        ValueError, match=r"layer dw cannot be factorized: depthwise conv \(groups=8\)"
    ):
        plan.with_rank("dw", 1)
    with pytest.raises(
        ValueError, match=r"rank 6 for fc is past break-even \(132 >= 120 dense params\)"
    ):
        plan.with_rank("fc", 6)
    low = lowrank.factorize(WithDepthwise(), plan=plan)
    with pytest.raises(
        ValueError, match="plan layer fc is already a LowRankLinear; lowrank.densify"
    ):
        lowrank.factorize(low, plan=plan)
    forged = lowrank.Plan.from_json(plan.to_json().replace('"rank": null', '"rank": 2', 1))
    with pytest.raises(ValueError, match="layer dw cannot be factorized"):
        lowrank.factorize(WithDepthwise(), plan=forged)
    with pytest.raises(ValueError, match="not a lowrank plan"):
        lowrank.Plan.from_json('{"layers": []}')
    with pytest.raises(TypeError, match="plan must be a lowrank.Plan"):
        lowrank.factorize(WithDepthwise(), plan={"fc": 2})


def test_tied_transposed_and_clashing_layers_are_reported_not_broken():
    class Odd(eqx.Module):
        shared: eqx.nn.Shared
        up: eqx.nn.ConvTranspose2d
        fc: eqx.nn.Linear

        def __init__(self):
            a, b = eqx.nn.Linear(16, 16, key=KEY), eqx.nn.Linear(16, 16, key=jax.random.key(1))
            self.shared = eqx.nn.Shared((a, b), lambda p: p[1].weight, lambda p: p[0].weight)
            self.up = eqx.nn.ConvTranspose2d(4, 4, 3, key=KEY)
            self.fc = eqx.nn.Linear(16, 16, key=KEY)

    plan = lowrank.plan(Odd(), rank=2)
    reasons = {l.path: l.skipped for l in plan.layers if l.rank is None}
    assert reasons["up"] == "ConvTranspose2d is not supported yet"
    assert any("tied" in (r or "") for r in reasons.values())
    assert plan["fc"].rank == 2
    assert "fc" in {l.path for l in lowrank.summary(Odd()).layers}
    clash = {"a.b": eqx.nn.Linear(4, 4, key=KEY), "a": {"b": eqx.nn.Linear(4, 4, key=KEY)}}
    with pytest.raises(ValueError, match=r"two layers share the dotted path\(s\) \['a.b'\]"):
        lowrank.plan(clash, rank=1)


def test_initializer_contract_is_enforced():
    class Wrong:
        calibration = "never"

        def __call__(self, problem, *, key):
            m, n = problem.weight.shape
            return lowrank.Factors(jnp.zeros((m, 1)), jnp.zeros((1, n)), problem.bias)

    class NaNs:
        calibration = "never"

        def __call__(self, problem, *, key):
            u, v, b = lowrank.Spectral()(problem, key=key)[:3]
            return lowrank.Factors(u * jnp.nan, v, b)

    class NeedsData:
        calibration = "required"

        def __call__(self, problem, *, key):
            return lowrank.Spectral()(problem, key=key)

    with pytest.raises(
        ValueError, match=r"returned u \(32, 1\), v \(1, 20\) for layers.0; expected \(32, 3\)"
    ):
        lowrank.factorize(mlp(key=KEY), rank=3, init=Wrong())
    with pytest.raises(ValueError, match="produced non-finite factors for layers.0"):
        lowrank.factorize(mlp(key=KEY), rank=3, init=NaNs())
    with pytest.raises(ValueError, match="needs calibration data: pass calibration="):
        lowrank.factorize(mlp(key=KEY), rank=3, init=NeedsData())
    with pytest.raises(TypeError, match="init must be a registered name or an initializer object"):
        lowrank.factorize(mlp(key=KEY), rank=3, init=3)
    with pytest.raises(TypeError, match="must be callable as init"):
        lowrank.register_initializer("bad", object())
    with pytest.raises(ValueError, match="no layer selected"):
        lowrank.plan(mlp(key=KEY), rank=2, where=lambda p, l: False)


class _TiedAndTransposed(eqx.Module):
    shared: eqx.nn.Shared
    up: eqx.nn.ConvTranspose2d

    def __init__(self):
        a, b = eqx.nn.Linear(16, 16, key=KEY), eqx.nn.Linear(16, 16, key=jax.random.key(1))
        self.shared = eqx.nn.Shared((a, b), lambda p: p[1].weight, lambda p: p[0].weight)
        self.up = eqx.nn.ConvTranspose2d(4, 4, 3, key=KEY)


@pytest.mark.parametrize(
    "build,kwargs,reason",
    [
        (
            lambda: mlp(key=KEY),
            {"rank": 10**9},
            r"layers.0: rank 1000000000 >= full rank 20: nothing to save",
        ),
        (lambda: mlp(key=KEY), {"rank": 1.0}, r"layers.1: rank 32 >= full rank 32"),
        (
            lambda: mlp(key=KEY),
            {"rank": lowrank.Budget(params=1.0)},
            r"budget affords the exact dense layer",
        ),
        (
            lambda: [eqx.nn.ConvTranspose2d(4, 4, 3, key=KEY)],
            {"rank": 2},
            r"0: ConvTranspose2d is not supported yet",
        ),
        (
            _TiedAndTransposed,
            {"rank": 2, "target": ["shared.pytree.1"]},
            r"shared.pytree.1: weight is tied",
        ),
    ],
)
def test_nothing_to_factorize_warns_with_each_reason_and_returns_the_model(build, kwargs, reason):
    model = build()
    with pytest.warns(
        UserWarning,
        match=r"nothing to factorize \(rank=.*\), the model is returned unchanged\. .*" + reason,
    ):
        out = lowrank.factorize(model, **kwargs)
    assert out is model
    plan = lowrank.plan(model, **kwargs)
    with pytest.warns(UserWarning, match="Lower the rank or budget"):
        out, returned = lowrank.factorize(model, plan=plan, return_plan=True)
    assert out is model and returned.factorized == []
    assert "no layer is factorized" in str(plan)


def test_nan_bias_is_named_not_blamed_on_calibration():
    model = mlp(key=KEY)
    bad = eqx.tree_at(lambda m: m.layers[1].bias, model, model.layers[1].bias.at[3].set(jnp.nan))
    with pytest.raises(
        ValueError, match=r"layer layers.1 has a non-finite bias \(NaN/inf\); fix or re-initialize"
    ) as info:
        lowrank.factorize(bad, rank=2, init="spectral")
    assert "calibration" not in str(info.value) and "try init='spectral'" not in str(info.value)


def test_initializers_subclass_one_base_that_declares_calibration():
    for name in ("spectral", "random", "nkp", "whitened"):
        init = lowrank.get_initializer(name)
        assert isinstance(init, lowrank.Initializer)
        assert init.calibration in ("never", "optional", "required")

    class Undeclared(lowrank.Initializer):
        def __call__(self, problem, *, key):
            return lowrank.Spectral()(problem, key=key)

    with pytest.raises(TypeError, match="calibration"):
        Undeclared()

    class Misdeclared(lowrank.Initializer):
        calibration = "sometimes"

        def __call__(self, problem, *, key):
            return lowrank.Spectral()(problem, key=key)

    with pytest.raises(ValueError, match=r"calibration='sometimes'; set it to one of \('never'"):
        lowrank.register_initializer("misdeclared", Misdeclared())
    with pytest.raises(ValueError, match=r"init has calibration='sometimes'"):
        lowrank.factorize(mlp(key=KEY), rank=2, init=Misdeclared())
    with pytest.raises(ValueError, match="unknown init 'nope'"):
        lowrank.get_initializer("nope")


def test_densify_and_save_refuse_layers_carrying_activations(tmp_path):
    low, plan = lowrank.factorize(
        eqx.nn.MLP(6, 3, 8, 1, key=jax.random.key(0)),
        rank=2,
        return_plan=True,
        fuse_activations=False,
    )
    first = low.layers[0]
    fused = eqx.tree_at(
        lambda m: m.layers[0],
        low,
        lowrank.LowRankLinear(first.u, first.v, first.bias, inner_activation="gelu"),
    )
    with pytest.raises(
        ValueError, match=r"densify: layer layers.0 carries .*inner_activation='gelu'.*without them"
    ):
        lowrank.densify(fused)
    with pytest.raises(ValueError, match=r"lowrank.save: layer layers.0 carries .*does not record"):
        lowrank.save(tmp_path / "m", fused, plan)
