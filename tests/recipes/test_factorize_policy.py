import dataclasses
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank
from recipes._factorize_policy import check_policy, check_rank, stable_rank, stable_ranks
from recipes._policy_ranks import _rank_rule
from recipes.config import ConfigError, FactorizeConfig, ImageModelConfig, load_config
from recipes.models import efficientnet_b0, resnet18
from recipes.policy import POLICY_TARGETS, apply_policy, module_at, normalized_activations


def conv_paths(model):
    is_conv = lambda x: isinstance(x, eqx.nn.Conv2d)
    return {
        jax.tree_util.keystr(path, simple=True, separator="."): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(model, is_leaf=is_conv)
        if is_conv(leaf)
    }


def selected(policy, model):
    target = POLICY_TARGETS[policy][1]
    return {p for p in conv_paths(model) if re.fullmatch(target, p)}


def test_policies_select_the_published_layers():
    resnet, _ = resnet18(10, stem="cifar", width=8, key=jax.random.key(0))
    paths = conv_paths(resnet)
    assert selected("khodak", resnet) == {p for p in paths if p.startswith("layers.")}
    assert len(selected("khodak", resnet)) == 19  # all but the stem
    assert selected("pufferfish", resnet) == {p for p in paths if p.startswith("layers.3.")}
    effnet, _ = efficientnet_b0(10, key=jax.random.key(0))
    chosen = selected("efficientnet", effnet)
    assert len(chosen) == 15 + 16 + 1  # expand (not in block 0), project, head
    assert all(conv_paths(effnet)[p].groups == 1 and ".se." not in p for p in chosen)


def test_module_at_reads_the_layer_at_every_dotted_path():
    resnet, _ = resnet18(10, stem="cifar", width=8, key=jax.random.key(0))
    paths = conv_paths(resnet)
    assert all(module_at(resnet, p) is conv for p, conv in paths.items())
    assert module_at(resnet, "layers.1.blocks.0") is resnet.layers[1].blocks[0]


def config(policy, **factorize):
    base = load_config("resnet18_digits")
    return dataclasses.replace(base, factorize=FactorizeConfig(policy=policy, **factorize))


def test_pufferfish_factorizes_the_last_stage_only():
    model, _ = resnet18(10, stem="cifar", width=8, key=jax.random.key(0))
    same, no_plan = apply_policy(model, config("none"))
    assert same is model and no_plan is None
    small, plan = apply_policy(model, config("pufferfish", rank=2))
    assert {lp.path for lp in plan.factorized} == {
        p for p in conv_paths(model) if p.startswith("layers.3.")
    }
    factorized = {
        jax.tree_util.keystr(path, simple=True, separator=".")
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            small, is_leaf=lambda x: isinstance(x, lowrank.LowRankConv)
        )
        if isinstance(leaf, lowrank.LowRankConv)
    }
    assert factorized == {p for p in conv_paths(model) if p.startswith("layers.3.")}
    assert isinstance(small.conv1, eqx.nn.Conv2d) and isinstance(small.fc, eqx.nn.Linear)


def test_rank_strings_become_budgets():
    assert _rank_rule("params:0.3") == lowrank.Budget(params=0.3)
    assert _rank_rule("flops:0.5") == lowrank.Budget(flops=0.5)
    assert _rank_rule("energy:0.9") == "energy:0.9" and _rank_rule(16) == 16


def test_bad_factorize_settings_are_config_errors():
    with pytest.raises(
        ConfigError,
        match="factorize.policy='efficientnet' applies to efficientnet models, not model.name='resnet18'",
    ):
        check_policy(config("efficientnet"))
    with pytest.raises(
        ConfigError,
        match="factorize.init='svd' is not a registered initializer; available: .*spectral",
    ):
        check_policy(config("khodak", init="svd"))
    with pytest.raises(ConfigError, match=r"factorize.rank='params:2': Budget\(params=2.0\)"):
        check_policy(config("khodak", rank="params:2"))
    effnet = dataclasses.replace(
        config("efficientnet"), model=ImageModelConfig(name="efficientnet_b0")
    )
    check_policy(effnet)


def with_spectrum(shape, singular_values, seed):
    """A weight of `shape` whose (out, fan_in) matrix has exactly these singular values."""
    rng = np.random.default_rng(seed)
    m, n = shape[0], int(np.prod(shape[1:]))
    u, _ = np.linalg.qr(rng.normal(size=(m, m)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    s = np.zeros((m, n))
    s[: len(singular_values), : len(singular_values)] = np.diag(singular_values)
    return jnp.asarray((u @ s @ v.T).reshape(shape), jnp.float32)


def test_stable_rank_is_squared_frobenius_over_squared_spectral_norm():
    np.testing.assert_allclose(stable_rank(with_spectrum((4, 6), [3, 2, 1], 0)), 14 / 9, rtol=1e-5)
    np.testing.assert_allclose(stable_rank(with_spectrum((8, 2, 3, 3), [1] * 8, 1)), 8, rtol=1e-5)


def test_stable_ranks_round_up_and_scale_by_the_initial_weights():
    mlp = eqx.nn.MLP(6, 4, 5, depth=2, key=jax.random.key(0))
    trained = eqx.tree_at(lambda m: m.layers[1].weight, mlp, with_spectrum((5, 5), [3, 2, 1], 2))
    assert stable_ranks(trained, r"layers\.1") == {"layers.1": 2}  # ceil(14/9)
    flat = eqx.tree_at(lambda m: m.layers[1].weight, mlp, with_spectrum((5, 5), [1] * 5, 3))
    assert stable_ranks(trained, r"layers\.1", initial=flat) == {"layers.1": 2}  # x 5/5
    peaked = eqx.tree_at(
        lambda m: m.layers[1].weight, mlp, with_spectrum((5, 5), [2, 1, 1, 1, 1], 4)
    )
    assert stable_ranks(trained, r"layers\.1", initial=peaked) == {
        "layers.1": 4
    }  # ceil(14/9 x 5/2)
    assert stable_ranks(peaked, r"layers\.1", initial=trained) == {"layers.1": 5}  # capped at full


def test_stable_rule_gives_each_layer_its_stable_rank():
    model, _ = resnet18(10, stem="cifar", width=8, key=jax.random.key(0))
    small, plan = apply_policy(model, config("pufferfish", rank="stable"))
    for path, layer in selected_layers("pufferfish", model).items():
        w = np.asarray(layer.weight, np.float64).reshape(layer.weight.shape[0], -1)
        s = np.linalg.svd(w, compute_uv=False)
        stable = np.sum(s**2) / s[0] ** 2
        # the library's float32 stable rank may round across an integer: either ceil is right
        expected = {int(np.ceil(stable * (1 - 1e-5))), int(np.ceil(stable * (1 + 1e-5)))}
        lp = plan[path]
        assert lp.rank in expected or (lp.rank is None and max(expected) * sum(w.shape) >= w.size)


def selected_layers(policy, model):
    return {p: l for p, l in conv_paths(model).items() if p in selected(policy, model)}


def test_new_factorize_settings_are_checked_before_compute():
    cases = [
        (
            config("none", warmup_steps=5),
            "factorize.warmup_steps=5 has no effect with factorize.policy='none'; choose a policy",
        ),
        (
            config("none", frobenius_decay=1e-4),
            "factorize.frobenius_decay=0.0001 has no effect with factorize.policy='none'",
        ),
        (
            config("khodak", warmup_steps=300),
            "factorize.warmup_steps=300 leaves no low-rank training within train.steps=300",
        ),
        (
            config("khodak", frobenius_decay=-1.0),
            "factorize.frobenius_decay=-1.0 must not be negative",
        ),
        (
            config("khodak", init="whitened"),
            "factorize.init='whitened' needs calibration images; set factorize.calibration",
        ),
        (
            config("khodak", calibration=64),
            "factorize.init='spectral' does not use calibration images; set factorize.calibration=0",
        ),
        (
            config("khodak", rank="stable:max"),
            "factorize.rank='stable:max' is not a stable rank rule; use 'stable' or 'stable:scaled'",
        ),
        (
            config("khodak", rank="stable:scaled"),
            "factorize.rank='stable:scaled' is the full rank at initialization; set factorize.warmup_steps > 0",
        ),
    ]
    for bad, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_policy(bad)
    check_policy(
        config("khodak", rank="stable:scaled", warmup_steps=10, init="nkp", calibration=64)
    )


def test_a_budget_that_cannot_be_met_fails_before_training():
    model, _ = resnet18(10, stem="cifar", width=8, key=jax.random.key(0))
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "factorize.rank='params:0.01' with factorize.policy='khodak': Budget(params=0.01) cannot be met: rank 1 in every selected layer already needs"
        ),
    ):
        check_rank(model, config("khodak", rank="params:0.01"))
    check_rank(model, config("khodak", rank="params:0.3"))
    check_rank(model, config("khodak", rank="stable"))  # decided on trained weights: always fits


def test_normalized_activations_are_what_the_network_computes_after_each_conv():
    from recipes.models import BATCH_AXIS

    model, state = resnet18(10, stem="cifar", width=4, key=jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (6, 3, 16, 16))
    run = jax.vmap(
        lambda x, s: model(x, s), axis_name=BATCH_AXIS, in_axes=(0, None), out_axes=(0, None)
    )
    for _ in range(3):  # training-mode passes move the running statistics off (0, 1)
        _, state = run(images * 3.0 + 1.0, state)
    fns = normalized_activations(model, state, POLICY_TARGETS["khodak"][1])
    assert len(fns) == 19
    block = model.layers[1].blocks[0]
    x = jax.random.normal(jax.random.key(2), (4, 16, 16))  # stage 1 takes 4 channels

    bn = lambda norm, z: norm(z, state, inference=True)[0]
    want = {
        "conv1": jax.nn.relu(bn(block.bn1, block.conv1(x))),  # BN, ReLU
        "conv2": bn(
            block.bn2, block.conv2(jax.nn.relu(bn(block.bn1, block.conv1(x))))
        ),  # BN, then the sum
        "downsample.conv": bn(block.downsample.bn, block.downsample.conv(x)),
    }
    inputs = {"conv1": x, "conv2": jax.nn.relu(bn(block.bn1, block.conv1(x))), "downsample.conv": x}
    for name, expected in want.items():
        conv = block.downsample.conv if name == "downsample.conv" else getattr(block, name)
        fn = fns[re.escape(f"layers.1.blocks.0.{name}")]
        got = jnp.moveaxis(fn(jnp.moveaxis(conv(inputs[name]), 0, -1)), -1, 0)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want["downsample.conv"], block.downsample.conv(x), atol=1e-2)  # BN acts

    effnet, effstate = efficientnet_b0(10, key=jax.random.key(0))
    eff = normalized_activations(effnet, effstate, POLICY_TARGETS["efficientnet"][1])
    z = jnp.linspace(-3.0, 3.0, 2 * 96).reshape(2, 96)  # stages.1.blocks.0.expand: 16 -> 96
    expand = eff[re.escape("stages.1.blocks.0.expand.conv")](z)
    np.testing.assert_allclose(expand, jax.nn.silu(z / np.sqrt(1 + 1e-5)), rtol=1e-5, atol=1e-6)
    project = eff[re.escape("stages.1.blocks.0.project.conv")](z[:, :24])
    np.testing.assert_allclose(project, z[:, :24] / np.sqrt(1 + 1e-5), rtol=1e-5, atol=1e-6)


def test_policy_reads_calibration_needs_from_the_initializer():
    class NeedsImages(lowrank.Initializer):
        calibration = "required"

        def __call__(self, problem, *, key):
            return lowrank.Spectral()(problem, key=key)

    lowrank.register_initializer("needs-images-test", NeedsImages())
    with pytest.raises(
        ConfigError, match="factorize.init='needs-images-test' needs calibration images"
    ):
        check_policy(config("khodak", init="needs-images-test"))
    check_policy(config("khodak", init="needs-images-test", calibration=64))
