"""fold_batchnorm: the folded model equals the unfolded one at inference (float64 reference)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank
from recipes.models import (
    BATCH_AXIS,
    FoldedBatchNorm,
    MobileNetV2,
    fold_batchnorm,
    resnet18,
    resnet50,
)


def _trained_stats(model, state, key):
    """Random BatchNorm affine weights and running statistics (debiased after 3 updates)."""
    bns = [
        m
        for m in jax.tree.leaves(model, is_leaf=lambda m: isinstance(m, eqx.nn.BatchNorm))
        if isinstance(m, eqx.nn.BatchNorm)
    ]
    keys = iter(jax.random.split(key, 4 * len(bns)))
    normal = lambda shape: jax.random.normal(next(keys), shape)
    for bn in bns:
        c = bn.weight.shape
        state = state.set(bn.batch_state_index, (0.5 * normal(c), 0.5 + jnp.exp(normal(c))))
        state = state.set(bn.batch_counter, state.get(bn.batch_counter) + 3)
    is_bn = lambda m: isinstance(m, eqx.nn.BatchNorm)
    model = eqx.tree_at(
        lambda m: (
            [b.weight for b in jax.tree.leaves(m, is_leaf=is_bn) if is_bn(b)]
            + [b.bias for b in jax.tree.leaves(m, is_leaf=is_bn) if is_bn(b)]
        ),
        model,
        [1.0 + 0.3 * normal(b.weight.shape) for b in bns]
        + [0.3 * normal(b.bias.shape) for b in bns],
    )
    return model, state


def _infer(model, state, x):
    return jax.vmap(lambda x: model(x, state, key=None, inference=True)[0], axis_name=BATCH_AXIS)(x)


MODELS = {
    "resnet18": lambda: resnet18(10, stem="cifar", width=4, key=jax.random.key(0)),
    "resnet50": lambda: resnet50(10, stem="cifar", width=4, key=jax.random.key(1)),
    "mobilenet_v2": lambda: eqx.nn.make_with_state(MobileNetV2)(
        num_classes=10, blocks_per_stage=1, key=jax.random.key(2)
    ),
}


@pytest.mark.parametrize(
    "name, factorized",
    [("resnet18", False), ("resnet18", True), ("resnet50", False), ("mobilenet_v2", False)],
)
def test_folded_equals_unfolded_at_inference_to_1e_5(name, factorized):
    model, state = _trained_stats(*MODELS[name](), jax.random.key(3))
    if factorized:
        model = lowrank.factorize(model, rank=lowrank.Budget(params=0.5))
    folded = fold_batchnorm(model, state)
    is_bn = lambda m: isinstance(m, eqx.nn.BatchNorm)
    assert not any(is_bn(m) for m in jax.tree.leaves(folded, is_leaf=is_bn))
    x = jax.random.normal(jax.random.key(9), (2, 3, 16, 16))
    got = np.asarray(jax.jit(_infer)(folded, state, x), np.float64)
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree.map(
            lambda a: jnp.asarray(np.asarray(a, np.float64)) if eqx.is_inexact_array(a) else a, t
        )
        want = np.asarray(eqx.filter_jit(_infer)(to64(model), to64(state), to64(x)))  # unfolded
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= 1e-5, err


def test_a_factorized_conv_folds_into_its_1x1_stage():
    model, state = _trained_stats(*MODELS["resnet18"](), jax.random.key(3))
    low = lowrank.factorize(
        model, rank=2, where=lambda path, layer: path == "layers.0.blocks.0.conv1"
    )
    folded = fold_batchnorm(low, state)
    before, after = low.layers[0].blocks[0].conv1, folded.layers[0].blocks[0].conv1
    assert isinstance(after, lowrank.LowRankConv) and after.rank == 2
    np.testing.assert_array_equal(after.v, before.v)  # only u and the bias absorb it
    assert after.bias is not None and isinstance(folded.layers[0].blocks[0].bn1, FoldedBatchNorm)


def test_a_model_without_pairs_is_refused_with_the_supported_types():
    with pytest.raises(
        ValueError, match=r"no conv → BatchNorm pair in this MLP; it folds the pairs of ConvBNAct"
    ):
        fold_batchnorm(
            eqx.nn.MLP(2, 2, 2, 1, key=jax.random.key(0)),
            eqx.nn.State(eqx.nn.MLP(2, 2, 2, 1, key=jax.random.key(0))),
        )
