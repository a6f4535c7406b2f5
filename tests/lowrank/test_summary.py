"""summary: per-layer and total parameter/FLOP counts, dense and factorized."""

import jax
import jax.numpy as jnp

import lowrank

from ._models import CNN

KEY = jax.random.key(0)


def test_summary_counts_dense_and_factorized_cnn():
    model = CNN(key=KEY)
    s = lowrank.summary(model, example=jnp.zeros((3, 16, 16)))
    rows = {l.path: l for l in s.layers}
    # convs.0: 16x3x3x3 + bias, 16x16 output positions
    assert rows["convs.0"].params == 16 * 27 + 16
    assert rows["convs.0"].flops == (2 * 16 * 27 + 16) * 16 * 16
    # convs.1: stride 2, padding (1, 2): out 8 x 9
    assert rows["convs.1"].flops == (2 * 24 * 144 + 24) * 8 * 9
    low = lowrank.factorize(model, rank=4)
    s2 = lowrank.summary(low, example=jnp.zeros((3, 16, 16)))
    rows2 = {l.path: l for l in s2.layers}
    assert rows2["convs.1"].rank == 4
    assert rows2["convs.1"].params == 4 * (24 + 144) + 24
    assert rows2["convs.1"].flops == (2 * 4 * (24 + 144) + 24) * 8 * 9
    assert s2.total_params < s.total_params
    assert "LowRankConv" in str(s2) and "model total" in str(s2)


def test_summary_without_example_counts_per_position():
    s = lowrank.summary(CNN(key=KEY))
    assert s.flops_per_position and "per output position" in str(s)
