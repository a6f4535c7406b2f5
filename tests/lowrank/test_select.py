"""Selection by type, target, exclude and where; paths through lists, dicts and nesting."""

import equinox as eqx
import jax
import jax.numpy as jnp
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
    assert sorted(_paths(plan)) == [
        "blocks.0.attn.query_proj",
        "blocks.1.attn.query_proj",
        "heads.cls",
    ]


def test_exclude_applies_before_target_and_where_filters():
    plan = lowrank.plan(
        Nested(key=KEY), rank=2, target=r"blocks.*", exclude=["attn.key_proj", "blocks.1.mlp.fc1"]
    )
    paths = _paths(plan)
    assert "blocks.0.attn.key_proj" not in paths and "blocks.1.mlp.fc1" not in paths
    assert "blocks.1.mlp.fc2" in paths
    plan = lowrank.plan(
        Nested(key=KEY), rank=2, where=lambda path, layer: isinstance(layer, eqx.nn.Conv)
    )
    assert [l.path for l in plan.layers] == ["pair.1", "depthwise"]


def test_target_that_matches_nothing_lists_nearest_paths():
    with pytest.raises(
        ValueError,
        match=r"target 'blocks.0.atn.query_proj' matches no layer; nearest available paths: \['blocks.0.attn.query_proj'",
    ):
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
    with pytest.raises(
        ValueError, match=r"exclude 'blocks.0.mlp.fc3' matches no layer; nearest available paths"
    ):
        lowrank.plan(Nested(key=KEY), rank=2, exclude=["blocks.0.mlp.fc3"])


def test_parent_module_names_cover_every_layer_below():
    model = Nested(key=KEY)
    attn = [
        f"blocks.{b}.attn.{p}_proj" for b in (0, 1) for p in ("query", "key", "value", "output")
    ]
    assert sorted(_paths(lowrank.plan(model, rank=2, target=["attn"]))) == sorted(attn)
    paths = _paths(lowrank.plan(model, rank=2, exclude=["blocks.0"]))
    assert not any(p.startswith("blocks.0.") for p in paths) and "blocks.1.mlp.fc1" in paths
    assert _paths(lowrank.plan(model, rank=2, target=["0.mlp"])) == [
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
    ]
    # the README's own example: a regex key and a parent-module key
    plan = lowrank.plan(model, rank={r"blocks\.\d+\.mlp\..*": 4, "attn": 0.25})
    assert plan["blocks.1.mlp.fc2"].rank == 4 and plan["blocks.0.attn.key_proj"].rank == 8
    assert plan["heads.cls"].rank is None and plan["heads.cls"].skipped == "no rank rule matched"


def test_a_name_covers_whole_path_parts_only():
    model = {"attn": eqx.nn.Linear(8, 8, key=KEY), "attn_out": {"fc": eqx.nn.Linear(8, 8, key=KEY)}}
    assert _paths(lowrank.plan(model, rank=1, target=["attn"])) == ["attn"]
    with pytest.raises(ValueError, match="target 'ttn' matches no layer"):
        lowrank.plan(model, rank=1, target=["ttn"])


def test_parent_module_names_set_activations_below_them():
    from lowrank._index import resolve_activations

    found = resolve_activations(
        lowrank.select(Nested(key=KEY)), {"mlp": jax.nn.gelu, "blocks.1": None}
    )
    assert found["blocks.0.mlp.fc1"] is jax.nn.gelu and found["blocks.0.mlp.fc2"] is jax.nn.gelu
    assert found["blocks.1.mlp.fc1"] is jax.nn.gelu  # first matching key wins
    assert found["blocks.1.attn.query_proj"] is lowrank._select.identity
    assert "blocks.0.attn.query_proj" not in found


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"target": "convs.[0"},
            r"target='convs.\[0' is not a valid regex \(unterminated character set",
        ),
        ({"exclude": "(head"}, r"exclude='\(head' is not a valid regex .*re.escape"),
        (
            {"rank": {"convs[": 2}},
            r"rank key 'convs\[' is not a valid regex .*list of layer/module names",
        ),
    ],
)
def test_bad_regex_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lowrank.plan(CNN(key=KEY), **{"rank": 2, **kwargs})


def test_bad_activations_regex_names_the_argument():
    with pytest.raises(ValueError, match=r"activations key 'head\)' is not a valid regex"):
        lowrank.factorize(CNN(key=KEY), rank=2, activations={"head)": None})


def test_a_root_level_layer_is_named_root():
    layer = eqx.nn.Linear(16, 32, key=KEY)
    plan = lowrank.plan(layer, rank=2, target=["<root>"])
    assert _paths(plan) == ["<root>"] and "<root>" in str(plan)
    low = lowrank.factorize(layer, plan=plan)
    assert isinstance(low, lowrank.LowRankLinear) and low.rank == 2
    assert [l.path for l in lowrank.summary(low).layers] == ["<root>"]
    # calibration and example= find the root layer's arrays too
    assert lowrank.plan(layer, rank=2, example=jnp.zeros(16))["<root>"].positions == 1
    xs = jax.random.normal(KEY, (40, 16))
    assert lowrank.factorize(layer, rank=2, init="whitened", calibration=xs).rank == 2
    assert lowrank.plan(eqx.nn.MLP(4, 4, 8, 1, key=KEY), rank=2).layers[0].path == "layers.0"


def test_already_low_rank_layers_are_listed_with_the_reason():
    model = eqx.nn.MLP(20, 7, 32, 2, key=KEY)
    half = lowrank.factorize(model, rank=4, target=["layers.0"])
    plan = lowrank.plan(half, rank=lowrank.Budget(params=0.6))
    row = plan["layers.0"]
    assert row.rank is None and row.kind == "LowRankLinear" and row.shape == (32, 20)
    assert (
        row.skipped == "already low-rank (rank 4); lowrank.densify(model) first to re-factorize it"
    )
    assert row.params_before == row.params_after == 4 * (32 + 20) + 32  # its factors, as they are
    assert plan["layers.1"].rank is not None
    t = plan.totals()
    assert t["params_after"] / t["params_before"] <= 0.6
    with pytest.warns(
        UserWarning, match=r"nothing to factorize.*layers.0: already low-rank \(rank 4\)"
    ):
        lowrank.factorize(half, rank=2, target=["layers.0"])


class _Recurrent(eqx.Module):
    embed: eqx.nn.Embedding
    cells: list
    head: eqx.nn.Linear

    def __init__(self):
        k = jax.random.split(KEY, 4)
        self.embed = eqx.nn.Embedding(50, 16, key=k[0])
        self.cells = [eqx.nn.GRUCell(16, 16, key=k[1]), eqx.nn.LSTMCell(16, 16, key=k[2])]
        self.head = eqx.nn.Linear(16, 40, key=k[3])


def test_rnn_cells_and_embeddings_are_listed_as_unsupported():
    plan = lowrank.plan(_Recurrent(), rank=lowrank.Budget(params=0.5))
    assert [l.path for l in plan.layers] == ["embed", "cells.0", "cells.1", "head"]
    for path, kind in (("embed", "Embedding"), ("cells.0", "GRUCell"), ("cells.1", "LSTMCell")):
        row = plan[path]
        assert row.kind == kind and row.rank is None and not row.factorizable
        assert row.skipped == f"{kind} is not supported yet (not counted in params/FLOPs)"
        assert row.params_before == 0
    assert plan["head"].rank is not None and plan.budget["achieved"] <= 0.5
    low = lowrank.factorize(_Recurrent(), plan=plan)  # the listed modules pass the plan checks
    assert isinstance(low.head, lowrank.LowRankLinear)
    with pytest.warns(UserWarning, match=r"cells.0: GRUCell is not supported yet"):
        lowrank.factorize(_Recurrent(), rank=2, target=["cells"])
