"""Selection by type, target, exclude and where; paths through lists, dicts and nesting."""

import equinox as eqx
import jax
import pytest

import lowrank

from ._models import CNN, Block

KEY = jax.random.key(0)


class Nested(eqx.Module):
    blocks: list
    heads: dict
    pair: tuple
    depthwise: eqx.nn.Conv2d

    def __init__(self, *, key):
        k = jax.random.split(key, 6)
        self.blocks = [Block(key=k[0]), Block(key=k[1])]
        self.heads = {"cls": eqx.nn.Linear(32, 10, key=k[2])}
        self.pair = (eqx.nn.Linear(32, 32, key=k[3]), eqx.nn.Conv1d(32, 32, 3, key=k[4]))
        self.depthwise = eqx.nn.Conv2d(8, 8, 3, groups=8, key=k[5])


def _paths(plan):
    return [l.path for l in plan.factorized]


def test_layers_in_lists_dicts_tuples_and_attention_are_found():
    plan = lowrank.plan(Nested(key=KEY), rank=2)
    paths = _paths(plan)
    assert "blocks.1.attn.value_proj" in paths and "blocks.0.mlp.fc2" in paths
    assert "heads.cls" in paths and "pair.0" in paths and "pair.1" in paths


def test_depthwise_convs_are_skipped_with_reason():
    plan = lowrank.plan(Nested(key=KEY), rank=2)
    assert plan["depthwise"].rank is None
    assert "depthwise conv (groups=8)" in plan["depthwise"].skipped


def test_target_regex_is_a_full_match():
    plan = lowrank.plan(Nested(key=KEY), rank=2, target=r"blocks\.\d+\.attn\..*_proj")
    assert len(plan.layers) == 8
    assert all(".attn." in p for p in _paths(plan))


def test_target_list_takes_exact_paths_and_suffixes():
    plan = lowrank.plan(Nested(key=KEY), rank=2, target=["query_proj", "heads.cls"])
    assert sorted(_paths(plan)) == ["blocks.0.attn.query_proj", "blocks.1.attn.query_proj", "heads.cls"]


def test_exclude_applies_before_target_and_where_filters():
    plan = lowrank.plan(Nested(key=KEY), rank=2, target=r"blocks.*", exclude=["attn.key_proj", "blocks.1.mlp.fc1"])
    paths = _paths(plan)
    assert "blocks.0.attn.key_proj" not in paths and "blocks.1.mlp.fc1" not in paths
    assert "blocks.1.mlp.fc2" in paths
    plan = lowrank.plan(Nested(key=KEY), rank=2, where=lambda path, layer: isinstance(layer, eqx.nn.Conv))
    assert [l.path for l in plan.layers] == ["pair.1", "depthwise"]


def test_target_that_matches_nothing_lists_nearest_paths():
    with pytest.raises(ValueError, match=r"target 'blocks.0.atn.query_proj' matches no layer; nearest available paths: \['blocks.0.attn.query_proj'"):
        lowrank.plan(Nested(key=KEY), rank=2, target=["blocks.0.atn.query_proj"])
    with pytest.raises(ValueError, match="matches no layer"):
        lowrank.factorize(CNN(key=KEY), rank=2, target=r"conv\d")


def test_bad_pattern_types_are_rejected():
    with pytest.raises(TypeError, match="target must be a regex string or a list of path strings"):
        lowrank.plan(CNN(key=KEY), rank=2, target=3)


def test_non_equinox_objects_are_rejected():
    with pytest.raises(TypeError, match=r"expects an Equinox model.*got builtins.dict"):
        lowrank.factorize({"w": 1.0}, rank=2)
    with pytest.raises(TypeError, match="lowrank.summary expects an Equinox model"):
        lowrank.summary([1, 2, 3])


def test_exclude_that_matches_nothing_is_an_error_too():
    with pytest.raises(ValueError, match=r"exclude 'blocks.0.mlp.fc3' matches no layer; nearest available paths"):
        lowrank.plan(Nested(key=KEY), rank=2, exclude=["blocks.0.mlp.fc3"])
