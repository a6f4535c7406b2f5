"""bench/cola.py: its FLOP count against a hand count, its variants, and a --quick run."""

import math

import equinox as eqx
import jax
import jax.random as jr

import lowrank
from bench import cola
from recipes.models import Transformer

SHAPE = dict(d_model=32, n_layers=1, n_heads=2, context=16)


def _layers(model):
    is_layer = lambda x: isinstance(x, lowrank.LowRankLinear)
    return [x for x in jax.tree.leaves(model, is_leaf=is_layer) if is_layer(x)]


def test_flops_per_token_counts_every_matmul_by_hand():
    d, t = 32, 16
    dense = Transformer(**SHAPE, key=jr.key(0))
    # q, k, v, o (d x d) and fc1 (4d x d), fc2 (d x 4d), each with a bias; the T x T
    # scores and their weighted sum; the tied head to 256 bytes.
    by_hand = 4 * (2 * d * d + d) + (2 * 4 * d * d + 4 * d) + (2 * 4 * d * d + d)
    by_hand += 2 * 2 * t * d + 2 * d * 256
    assert cola.flops_per_token(dense, t) == by_hand
    r = cola.half_flops_rank(dense)
    assert r == round(12 * d * d / (2 * 18 * d))  # r (8d + 2 * 5d) = 12 d^2 / 2
    factored = cola.build("low rank", SHAPE, r, "silu", 0)
    low = 4 * (2 * r * 2 * d + d) + (2 * r * 5 * d + 4 * d) + (2 * r * 5 * d + d)
    assert cola.flops_per_token(factored, t) == low + 2 * 2 * t * d + 2 * d * 256
    assert math.isclose(cola.layer_flops_ratio(dense, r), r * 18 * d / (12 * d * d))


def test_cola_differs_from_low_rank_only_by_the_inner_activation():
    low = cola.build("low rank", SHAPE, 8, "gelu", 1)
    co = cola.build("CoLA", SHAPE, 8, "gelu", 1)
    assert len(_layers(low)) == 6 and len(_layers(co)) == 6
    assert {x.inner_activation for x in _layers(low)} == {None}
    assert {x.inner_activation for x in _layers(co)} == {"gelu"}
    arrays = [jax.tree.leaves(eqx.filter(m, eqx.is_array)) for m in (low, co)]
    assert all((a == b).all() for a, b in zip(*arrays)) and len(arrays[0]) == len(arrays[1])
    narrow = cola.build("dense narrow", SHAPE, 8, "gelu", 1)
    assert not _layers(narrow) and narrow.d_model < SHAPE["d_model"]


def test_quick_run_writes_its_table(tmp_path):
    path = tmp_path / "RESULTS.md"
    results = cola.main(["--quick", "--results", str(path)])
    text = path.read_text()
    assert "<!-- BEGIN cola -->" in text and "<!-- END cola -->" in text
    for variant in cola.VARIANTS:
        assert f"| {variant} |" in text
        (run,) = results[variant]["runs"]
        assert 0 < run["val"] < 9 and 0 < run["train"] < 9 and run["step_s"] > 0
    low, co, dense = results["low rank"], results["CoLA"], results["dense"]
    assert low["flops"] == co["flops"] < dense["flops"] and low["params"] == co["params"]
    assert low["runs"][0]["val"] != co["runs"][0]["val"]
