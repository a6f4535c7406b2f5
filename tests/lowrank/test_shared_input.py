"""SharedInputLinear against float64 numpy references of its members."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank

_NP_ACT = {
    None: lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "silu": lambda z: z / (1.0 + np.exp(-z)),
}


def _members(key):
    """A dense Linear with bias, a factorized layer with bias and a silu epilogue, and a
    CoLA layer (relu between its factors), all reading 6 inputs."""
    k1, k2, k3, k4, k5, k6 = jax.random.split(key, 6)
    dense = eqx.nn.Linear(6, 5, key=k1)
    normal = jax.random.normal
    low = lowrank.LowRankLinear(
        normal(k2, (4, 3)), normal(k3, (3, 6)), normal(k4, (4,)), activation="silu"
    )
    cola = lowrank.LowRankLinear(normal(k5, (7, 2)), normal(k6, (2, 6)), inner_activation="relu")
    return dense, low, cola


def _reference(layer, x):
    """float64 numpy output of one member."""
    f = lambda a: np.asarray(a, np.float64)
    if isinstance(layer, eqx.nn.Linear):
        return f(layer.weight) @ x + f(layer.bias)
    t = _NP_ACT[layer.inner_activation](f(layer.v) @ x)
    z = f(layer.u) @ t + (0.0 if layer.bias is None else f(layer.bias))
    return _NP_ACT[layer.activation](z)


def test_outputs_match_each_member_in_float64():
    layers = _members(jax.random.key(0))
    fused = lowrank.SharedInputLinear(layers)
    assert fused.first.shape == (5 + 3 + 2, 6)
    xs = np.asarray(jax.random.normal(jax.random.key(1), (4, 6)), np.float64)
    outs = jax.vmap(fused)(jnp.asarray(xs, jnp.float32))
    for layer, out in zip(layers, outs):
        expected = np.stack([_reference(layer, x) for x in xs])
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_members_give_back_the_layers():
    layers = _members(jax.random.key(2))
    back = lowrank.SharedInputLinear(layers).members
    for layer, again in zip(layers, back):
        assert type(again) is type(layer)
        same = jax.tree.map(
            np.array_equal, eqx.filter(layer, eqx.is_array), eqx.filter(again, eqx.is_array)
        )
        assert all(jax.tree.leaves(same))
    assert (back[1].activation, back[2].inner_activation) == ("silu", "relu")


def test_bad_members_are_named():
    dense, low, _ = _members(jax.random.key(3))
    with pytest.raises(ValueError, match="at least two"):
        lowrank.SharedInputLinear([dense])
    with pytest.raises(ValueError, match="same input"):
        lowrank.SharedInputLinear([dense, eqx.nn.Linear(4, 5, key=jax.random.key(0))])
    with pytest.raises(ValueError, match="layer 1 is a Conv1d"):
        lowrank.SharedInputLinear([dense, eqx.nn.Conv1d(6, 2, 1, key=jax.random.key(0))])
    stacked = lowrank.LowRankLinear(jnp.ones((2, 5, 1)), jnp.ones((2, 1, 6)))
    with pytest.raises(ValueError, match="layer 0 is stacked"):
        lowrank.SharedInputLinear([stacked, low])
    with pytest.raises(ValueError, match="unbatched input of shape \\(6,\\)"):
        lowrank.SharedInputLinear([dense, low])(jnp.ones((2, 6)))


def test_densify_merges_the_factorized_members():
    dense, _, _ = _members(jax.random.key(4))
    k1, k2 = jax.random.split(jax.random.key(5))
    low = lowrank.LowRankLinear(jax.random.normal(k1, (4, 3)), jax.random.normal(k2, (3, 6)))
    fused = lowrank.SharedInputLinear([dense, low])
    merged = lowrank.densify(fused)
    assert isinstance(merged, lowrank.SharedInputLinear)
    assert all(type(m) is eqx.nn.Linear for m in merged.members)
    x = np.asarray(jax.random.normal(jax.random.key(6), (6,)), np.float64)
    for layer, out in zip((dense, low), merged(jnp.asarray(x, jnp.float32))):
        np.testing.assert_allclose(np.asarray(out), _reference(layer, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="carries activation='silu'"):
        lowrank.densify(lowrank.SharedInputLinear(_members(jax.random.key(7))))
