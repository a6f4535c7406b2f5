"""Fused epilogues: factorize moves a known activation after a factorized Linear into it."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank

KEY = jax.random.key(0)
X = np.asarray(jax.random.normal(jax.random.key(1), (6, 12)))


def _np_act(name, z):
    """Float64 numpy activations: the kernels' relu, gelu (tanh form) and silu."""
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "gelu":
        return 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))
    if name == "silu":
        return z / (1.0 + np.exp(-z))
    if name == "tanh":
        return np.tanh(z)
    return z


def _np_layer(layer, h):
    """One factorized (or dense) layer in float64, without any epilogue."""
    w = np.asarray(layer.weight, np.float64)
    bias = 0.0 if layer.bias is None else np.asarray(layer.bias, np.float64)
    return h @ w.T + bias


def _np_chain(layers, acts, x=X):
    """x through the layers, each followed by its named activation (None: none)."""
    h = np.asarray(x, np.float64)
    for layer, act in zip(layers, acts):
        h = _np_act(act, _np_layer(layer, h))
    return h


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn, name", [(jax.nn.relu, "relu"), (jax.nn.gelu, "gelu")])
def test_mlp_activation_is_fused_and_the_function_kept(fn, name):
    model = eqx.nn.MLP(12, 5, 16, 2, activation=fn, final_activation=jax.nn.silu, key=KEY)
    low, plan = lowrank.factorize(model, rank=3, return_plan=True)
    assert [l.activation for l in low.layers] == [name, name, "silu"]
    assert [plan[f"layers.{i}"].epilogue for i in range(3)] == [name, name, "silu"]
    assert f"fused epilogue {name} (the layer applies it): layers.0, layers.1" in str(plan)
    assert "LowRankLinear+silu" in str(lowrank.summary(low))
    _close(jax.vmap(low)(X), _np_chain(low.layers, [name, name, "silu"]))
    unfused = lowrank.factorize(model, rank=3, fuse_activations=False)
    assert {l.activation for l in unfused.layers} == {None}
    assert unfused.activation is fn
    np.testing.assert_array_equal(jax.vmap(low)(X), jax.vmap(unfused)(X))  # the XLA path


def test_sequential_lambda_is_fused_nested_ones_too():
    k = jax.random.split(KEY, 3)
    model = eqx.nn.Sequential(
        [
            eqx.nn.Linear(12, 16, key=k[0]),
            eqx.nn.Lambda(jax.nn.silu),
            eqx.nn.Sequential([eqx.nn.Linear(16, 16, key=k[1]), eqx.nn.Lambda(jax.nn.relu)]),
            eqx.nn.Linear(16, 4, key=k[2]),
        ]
    )
    low, plan = lowrank.factorize(model, rank=3, return_plan=True)
    inner = low.layers[2].layers
    assert (low.layers[0].activation, inner[0].activation, low.layers[3].activation) == (
        "silu",
        "relu",
        None,
    )
    assert plan["layers.2.layers.0"].epilogue == "relu" and plan["layers.3"].epilogue is None
    want = _np_chain([low.layers[0], inner[0], low.layers[3]], ["silu", "relu", None])
    _close(jax.vmap(low)(X), want)


def test_unknown_or_unsupported_activations_stay_unfused():
    tanh_mlp = eqx.nn.MLP(12, 5, 16, 1, activation=jnp.tanh, key=KEY)
    custom = eqx.nn.MLP(12, 5, 16, 1, activation=lambda z: jax.nn.relu(z), key=KEY)
    for model in (tanh_mlp, custom):
        low, plan = lowrank.factorize(model, rank=3, return_plan=True)
        assert [l.activation for l in low.layers] == [None, None]
        assert low.activation is model.activation and not any(l.epilogue for l in plan.layers)
    _close(jax.vmap(lowrank.factorize(tanh_mlp, rank=3))(X), _np_chain(low.layers, ["tanh", None]))
    seq = eqx.nn.Sequential([eqx.nn.Linear(12, 16, key=KEY), eqx.nn.Lambda(jnp.tanh)])
    assert lowrank.factorize(seq, rank=3).layers[0].activation is None


def test_an_mlp_with_a_dense_hidden_layer_keeps_its_activation():
    model = eqx.nn.MLP(12, 5, 16, 2, final_activation=jax.nn.gelu, key=KEY)
    low = lowrank.factorize(model, rank=3, target=["layers.0", "layers.2"])
    assert isinstance(low.layers[1], eqx.nn.Linear) and low.activation is jax.nn.relu
    assert (low.layers[0].activation, low.layers[2].activation) == (None, "gelu")
    _close(jax.vmap(low)(X), _np_chain(low.layers, ["relu", "relu", "gelu"]))


def test_stacked_hidden_layers_of_a_scan_mlp_are_fused():
    model = eqx.nn.MLP(12, 5, 16, 3, scan=True, key=KEY)
    low = lowrank.factorize(model, rank=3)
    assert low.layers[1].stack_shape == (2,) and low.layers[1].activation == "relu"
    slices = [jax.tree_util.tree_map(lambda a, i=i: a[i], low.layers[1]) for i in range(2)]
    want = _np_chain([low.layers[0], *slices, low.layers[2]], ["relu"] * 3 + [None])
    _close(jax.vmap(low)(X), want)


def _np_grads(layers, x, c):
    """d sum(c * y) / d (u, v, bias) of the silu MLP y = W2 silu(W1 x + b1) + b2, float64."""
    (u1, v1, b1), (u2, v2, _) = [
        [np.asarray(a, np.float64) for a in (l.u, l.v, l.bias)] for l in layers
    ]
    z = x @ (u1 @ v1).T + b1
    s = 1.0 / (1.0 + np.exp(-z))
    gh = c @ (u2 @ v2)
    gz = gh * s * (1.0 + z * (1.0 - s))
    dw1, dw2 = gz.T @ x, c.T @ (z * s)
    return [dw1 @ v1.T, u1.T @ dw1, gz.sum(0), dw2 @ v2.T, u2.T @ dw2, c.sum(0)]


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_gradients_flow_through_the_fused_epilogue(impl):
    model = eqx.nn.MLP(12, 5, 16, 1, activation=jax.nn.silu, key=KEY)
    low = lowrank.with_kernels(lowrank.factorize(model, rank=3), impl=impl)
    assert low.layers[0].activation == "silu"
    c = np.asarray(jax.random.normal(jax.random.key(2), (6, 5)))
    grads = eqx.filter_grad(lambda m: jnp.sum(c * jax.vmap(m)(X)))(low)
    got = [g for l in grads.layers for g in (l.u, l.v, l.bias)]
    for g, want in zip(got, _np_grads(low.layers, np.asarray(X, np.float64), c)):
        _close(g, want)


def test_densify_puts_the_activations_back():
    model = eqx.nn.MLP(12, 5, 16, 2, activation=jax.nn.gelu, final_activation=jax.nn.relu, key=KEY)
    low = lowrank.factorize(model, rank=3)
    dense = lowrank.densify(low)
    assert all(isinstance(l, eqx.nn.Linear) for l in dense.layers)
    assert dense.activation is jax.nn.gelu and dense.final_activation is jax.nn.relu
    _close(jax.vmap(dense)(X), _np_chain(low.layers, ["gelu", "gelu", "relu"]))
    seq = eqx.nn.Sequential([eqx.nn.Linear(12, 16, key=KEY), eqx.nn.Lambda(jax.nn.silu)])
    back = lowrank.densify(lowrank.factorize(seq, rank=3))
    assert isinstance(back.layers[0], eqx.nn.Linear) and back.layers[1].fn is jax.nn.silu
    again = lowrank.factorize(dense, rank=3)  # the densified model fuses again
    assert [l.activation for l in again.layers] == ["gelu", "gelu", "relu"]
    edited = eqx.tree_at(lambda m: m.layers[1], low, dense.layers[1])  # no epilogue there
    with pytest.raises(ValueError, match=r"densify: activation was fused .*\['None', 'gelu'\]"):
        lowrank.densify(edited)


def test_save_and_load_keep_the_fused_epilogues(tmp_path):
    make = lambda key: eqx.nn.MLP(12, 5, 16, 2, activation=jax.nn.silu, key=key)
    low, plan = lowrank.factorize(make(KEY), rank=3, return_plan=True)
    lowrank.save(tmp_path / "m", low, plan)
    loaded = lowrank.load(tmp_path / "m", make(jax.random.key(7)))
    assert [l.activation for l in loaded.layers] == ["silu", "silu", None]
    np.testing.assert_array_equal(jax.vmap(loaded)(X), jax.vmap(low)(X))
    unfused_plan = lowrank.factorize(make(KEY), rank=3, return_plan=True, fuse_activations=False)
    with pytest.raises(ValueError, match=r"plan does not describe this model.*'silu'"):
        lowrank.save(tmp_path / "n", low, unfused_plan[1])
    with pytest.raises(ValueError, match=r"fused epilogues .*but factorizing dense_model fuses"):
        other = eqx.nn.MLP(12, 5, 16, 2, activation=jnp.tanh, key=KEY)
        lowrank.load(tmp_path / "m", other)
