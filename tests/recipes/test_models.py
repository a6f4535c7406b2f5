import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recipes.models import (
    BATCH_AXIS,
    ResNet,
    StochasticDepth,
    efficientnet_b0,
    resnet18,
    resnet34,
    resnet50,
)
from recipes.models._init import build
from recipes.models._layers import apply_norm, batch_norm


def n_params(model):
    return sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))


def convs(model):
    """Dotted path -> Conv2d, as a selector keyed on layer type would see them."""
    is_conv = lambda x: isinstance(x, eqx.nn.Conv2d)
    leaves = jax.tree_util.tree_leaves_with_path(model, is_leaf=is_conv)
    return {
        ".".join(str(getattr(k, "name", getattr(k, "idx", k))) for k in path): leaf
        for path, leaf in leaves
        if is_conv(leaf)
    }


# Published torchvision parameter counts at 1000 classes.
@pytest.mark.parametrize(
    "make, expected",
    [
        (resnet18, 11_689_512),
        (resnet34, 21_797_672),
        (resnet50, 25_557_032),
        (efficientnet_b0, 5_288_548),
    ],
)
def test_parameter_counts_match_published(make, expected):
    model, state = make(1000, key=jax.random.key(0))
    assert n_params(model) == expected
    # Running statistics are state, not parameters.
    assert n_params(state) > 0


def test_resnet_layout_and_initialization():
    model, _ = resnet18(10, stem="cifar", key=jax.random.key(1))
    layers = convs(model)
    assert len(layers) == 20  # stem + 16 block convs + 3 downsample shortcuts
    assert layers["conv1"].kernel_size == (3, 3) and layers["conv1"].stride == (1, 1)
    assert layers["layers.2.blocks.0.conv1"].stride == (2, 2)
    assert layers["layers.1.blocks.0.downsample.conv"].kernel_size == (1, 1)
    assert model.maxpool is None and model.fc.weight.shape == (10, 512)
    w = layers["layers.3.blocks.1.conv2"].weight  # He normal, fan-out = 512 * 3 * 3
    np.testing.assert_allclose(np.std(w), math.sqrt(2 / (512 * 9)), rtol=0.02)
    bound = 1 / math.sqrt(512)  # PyTorch's default Linear init
    assert np.abs(model.fc.weight).max() <= bound and np.abs(model.fc.weight).max() > 0.9 * bound

    big, _ = resnet50(key=jax.random.key(1))
    layers = convs(big)
    assert layers["conv1"].kernel_size == (7, 7) and layers["conv1"].stride == (2, 2)
    # v1.5: the stride sits in the 3x3 conv, not the first 1x1.
    assert layers["layers.1.blocks.0.conv1"].stride == (1, 1)
    assert layers["layers.1.blocks.0.conv2"].stride == (2, 2)
    assert big.fc.weight.shape == (1000, 2048)


def test_efficientnet_layout_and_initialization():
    model, _ = efficientnet_b0(10, key=jax.random.key(2))
    layers = convs(model)
    depthwise = {p: c for p, c in layers.items() if p.endswith("depthwise.conv")}
    assert len(depthwise) == 16
    assert all(c.groups == c.in_channels == c.out_channels for c in depthwise.values())
    assert sorted(c.kernel_size[0] for c in depthwise.values()) == [3] * 7 + [5] * 9
    assert "stages.0.blocks.0.expand.conv" not in layers  # expand ratio 1
    assert layers["stages.1.blocks.0.expand.conv"].weight.shape == (96, 16, 1, 1)
    assert layers["stages.1.blocks.0.se.fc1"].weight.shape == (4, 96, 1, 1)  # squeeze = in // 4
    assert layers["head.conv"].weight.shape == (1280, 320, 1, 1)
    assert len(layers) == 1 + 15 + 16 + 2 * 16 + 16 + 1
    # torchvision: classifier U(+-1/sqrt(out)) with zero bias; stochastic depth 0.2 * i / 16.
    assert np.abs(model.classifier.weight).max() <= 1 / math.sqrt(10)
    assert np.all(model.classifier.bias == 0)
    assert model.stages[6].blocks[0].drop_path is None  # 192 -> 320 has no residual
    assert model.stages[5].blocks[3].drop_path.p == pytest.approx(0.2 * 14 / 16)


def batched(model, train):
    def apply(x, state, key):
        return model(x, state, key=key, inference=not train)

    return eqx.filter_jit(
        jax.vmap(apply, axis_name=BATCH_AXIS, in_axes=(0, None, 0), out_axes=(0, None))
    )


def test_resnet18_cifar_forward_shares_batch_statistics_in_training_only():
    model, state = resnet18(10, stem="cifar", key=jax.random.key(0))
    rng = np.random.default_rng(0)
    a, b, c = (rng.normal(size=(1, 3, 32, 32)).astype(np.float32) for _ in range(3))
    keys = jax.random.split(jax.random.key(1), 2)
    forward = batched(model, train=True)
    out_ab, new_state = forward(np.concatenate([a, b]), state, keys)
    out_ac, _ = forward(np.concatenate([a, c]), state, keys)
    assert out_ab.shape == (2, 10) and np.all(np.isfinite(out_ab))
    assert not np.allclose(out_ab[0], out_ac[0])  # batch statistics mix the examples
    stats = [
        new_state.get(bn.batch_state_index) for bn in (model.bn1, model.layers[3].blocks[1].bn2)
    ]
    assert all(np.any(np.asarray(mean) != 0) for mean, _ in stats)
    infer = batched(model, train=False)
    out_ab, _ = infer(np.concatenate([a, b]), new_state, keys)
    out_ac, _ = infer(np.concatenate([a, c]), new_state, keys)
    np.testing.assert_allclose(out_ab[0], out_ac[0], rtol=1e-5, atol=1e-6)


def test_efficientnet_b0_eval_forward_at_32x32():
    model, state = efficientnet_b0(7, key=jax.random.key(0))
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    out, _ = batched(model, train=False)(x, state, jax.random.split(jax.random.key(1), 2))
    assert out.shape == (2, 7) and np.all(np.isfinite(out))


def test_stochastic_depth_keeps_the_mean_and_is_identity_at_inference():
    layer = StochasticDepth(0.25)
    x = jnp.ones(3)
    outs = jax.vmap(lambda k: layer(x, key=k))(jax.random.split(jax.random.key(0), 4000))
    kept = np.asarray(outs[:, 0] != 0)
    np.testing.assert_allclose(outs[kept], 1 / 0.75, rtol=1e-6)
    assert abs(kept.mean() - 0.75) < 0.03
    np.testing.assert_array_equal(eqx.nn.inference_mode(layer)(x), x)
    with pytest.raises(RuntimeError, match="StochasticDepth needs a `key` in training mode"):
        layer(x)


def test_bad_architecture_arguments():
    with pytest.raises(ValueError, match="block='dense': use 'basic' or 'bottleneck'"):
        ResNet("dense", (1,), num_classes=2, stem="cifar", key=jax.random.key(0))
    with pytest.raises(ValueError, match="stem='tiny': use 'imagenet' or 'cifar'"):
        ResNet("basic", (1,), num_classes=2, stem="tiny", key=jax.random.key(0))


class WithRawArray(eqx.Module):
    scale: jax.Array

    def __init__(self, *, key):
        self.scale = jnp.ones(3)


def test_build_rejects_arrays_outside_known_layers():
    with pytest.raises(TypeError, match=r"cannot initialize the array at \.scale"):
        build(WithRawArray, key=jax.random.key(0))


def test_build_is_deterministic_in_the_key():
    a, _ = resnet18(10, stem="cifar", width=8, key=jax.random.key(3))
    b, _ = resnet18(10, stem="cifar", width=8, key=jax.random.key(3))
    c, _ = resnet18(10, stem="cifar", width=8, key=jax.random.PRNGKey(4))
    np.testing.assert_array_equal(a.conv1.weight, b.conv1.weight)
    assert not np.allclose(a.conv1.weight, c.conv1.weight)


def test_apply_norm_keeps_bf16_activations_at_inference():
    bn, state = eqx.nn.make_with_state(batch_norm)(3)
    x = (jnp.arange(12.0).reshape(3, 2, 2) - 4).astype(jnp.bfloat16)
    y, _ = apply_norm(bn, x, state, inference=True)
    assert y.dtype == jnp.bfloat16
    # Fresh running statistics are mean 0, variance 1.
    np.testing.assert_allclose(
        np.asarray(y, np.float32), np.asarray(x, np.float32) / np.sqrt(1 + 1e-5), rtol=1e-2
    )
