import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank
from recipes._frobenius_decay import frobenius_decay, not_factors


class Net(eqx.Module):
    conv: eqx.Module
    fc: eqx.Module
    head: eqx.nn.Linear


def net(key):
    k1, k2, k3 = jax.random.split(key, 3)
    dense = Net(
        eqx.nn.Conv2d(3, 8, 3, padding=1, key=k1),
        eqx.nn.Linear(12, 10, key=k2),
        eqx.nn.Linear(10, 4, key=k3),
    )
    return lowrank.factorize(dense, rank=2, target=["conv", "fc"], init="random", key=key)


def penalty(model, lam):
    """λ/2·‖u v‖²_F summed over the factorized layers, by autodiff-able dense products."""
    total = 0.0
    for layer in (model.conv, model.fc):
        total = total + 0.5 * lam * jnp.sum(jnp.tensordot(layer.u, layer.v, axes=1) ** 2)
    return total


def test_frobenius_decay_matches_autodiff_of_the_penalty_in_float64():
    with jax.enable_x64(True):
        model = jax.tree.map(
            lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x,
            net(jax.random.key(0)),
        )
        params = eqx.filter(model, eqx.is_inexact_array)
        grads = jax.tree.map(jnp.ones_like, params)
        decay = frobenius_decay(0.3)
        updates, _ = decay.update(grads, decay.init(params), params)
        expected = eqx.filter_grad(lambda m: penalty(m, 0.3))(model)
        for name in ("conv", "fc"):
            for factor in ("u", "v"):
                got = getattr(getattr(updates, name), factor)
                want = 1.0 + getattr(getattr(expected, name), factor)
                assert got.dtype == jnp.float64
                np.testing.assert_allclose(got, want, rtol=1e-12)
        assert float(jnp.max(jnp.abs(expected.conv.v))) > 1e-3  # the penalty is not trivial
        # Everything else (biases, the dense head) passes through untouched.
        for untouched in (
            updates.conv.bias,
            updates.fc.bias,
            updates.head.weight,
            updates.head.bias,
        ):
            np.testing.assert_array_equal(untouched, jnp.ones_like(untouched))


def test_mask_leaves_factors_to_frobenius_decay():
    params = eqx.filter(net(jax.random.key(1)), eqx.is_inexact_array)
    mask = not_factors(params)
    assert (mask.conv.u, mask.conv.v, mask.fc.u, mask.fc.v) == (False,) * 4
    assert mask.conv.bias and mask.fc.bias and mask.head.weight and mask.head.bias
    decayed = optax.add_decayed_weights(1.0, mask=not_factors)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = decayed.update(zeros, decayed.init(params), params)
    assert float(jnp.max(jnp.abs(updates.conv.u))) == 0.0
    np.testing.assert_array_equal(updates.head.weight, params.head.weight)


def test_frobenius_decay_needs_params():
    decay = frobenius_decay(0.1)
    with pytest.raises(
        ValueError, match=r"frobenius_decay needs params: call update\(grads, state, params\)"
    ):
        decay.update({"w": jnp.ones(2)}, decay.init({"w": jnp.ones(2)}))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_decays_factors_through_their_product_and_the_rest_plainly(name):
    from recipes.config import OptimConfig
    from recipes.train import make_optimizer

    with jax.enable_x64(True):
        model = jax.tree.map(
            lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x,
            net(jax.random.key(2)),
        )
        params = eqx.filter(model, eqx.is_inexact_array)
        config = OptimConfig(name=name, lr=1.0, momentum=0.0, weight_decay=0.1)
        optimizer, _ = make_optimizer(config, 1, frobenius_decay=0.2)
        zero = jax.tree.map(jnp.zeros_like, params)
        updates, _ = optimizer.update(zero, optimizer.init(params), params)
        # Zero gradients: SGD and AdamW alike move only by the decay terms, negated.
        penalty_grads = eqx.filter_grad(lambda m: penalty(m, 0.2))(model)
        np.testing.assert_allclose(updates.conv.u, -penalty_grads.conv.u, rtol=1e-10)
        np.testing.assert_allclose(updates.fc.v, -penalty_grads.fc.v, rtol=1e-10)
        np.testing.assert_allclose(updates.head.weight, -0.1 * params.head.weight, rtol=1e-10)
        np.testing.assert_allclose(updates.fc.bias, -0.1 * params.fc.bias, rtol=1e-10)
