import dataclasses
import re

import equinox as eqx
import jax
import lowrank
import pytest

from recipes._factorize_policy import POLICY_TARGETS, _rank_rule, apply_policy, check_policy
from recipes.config import ConfigError, FactorizeConfig, ImageModelConfig, load_config
from recipes.models import efficientnet_b0, resnet18


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


def config(policy, **factorize):
    base = load_config("resnet18_digits")
    return dataclasses.replace(base, factorize=FactorizeConfig(policy=policy, **factorize))


def test_pufferfish_factorizes_the_last_stage_only():
    model, _ = resnet18(10, stem="cifar", width=8, key=jax.random.key(0))
    assert apply_policy(model, config("none")) is model
    small = apply_policy(model, config("pufferfish", rank=2))
    factorized = {
        jax.tree_util.keystr(path, simple=True, separator=".")
        for path, leaf in jax.tree_util.tree_leaves_with_path(small, is_leaf=lambda x: isinstance(x, lowrank.LowRankConv))
        if isinstance(leaf, lowrank.LowRankConv)
    }
    assert factorized == {p for p in conv_paths(model) if p.startswith("layers.3.")}
    assert isinstance(small.conv1, eqx.nn.Conv2d) and isinstance(small.fc, eqx.nn.Linear)


def test_rank_strings_become_budgets():
    assert _rank_rule("params:0.3") == lowrank.Budget(params=0.3)
    assert _rank_rule("flops:0.5") == lowrank.Budget(flops=0.5)
    assert _rank_rule("energy:0.9") == "energy:0.9" and _rank_rule(16) == 16


def test_bad_factorize_settings_are_config_errors():
    with pytest.raises(ConfigError, match="factorize.policy='efficientnet' applies to efficientnet models, not model.name='resnet18'"):
        check_policy(config("efficientnet"))
    with pytest.raises(ConfigError, match="factorize.init='svd' is not a registered initializer; available: .*spectral"):
        check_policy(config("khodak", init="svd"))
    with pytest.raises(ConfigError, match=r"factorize.rank='params:2': Budget\(params=2.0\)"):
        check_policy(config("khodak", rank="params:2"))
    effnet = dataclasses.replace(config("efficientnet"), model=ImageModelConfig(name="efficientnet_b0"))
    check_policy(effnet)
