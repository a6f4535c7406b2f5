"""Fast construction with torchvision's initialization.

A model is first traced abstractly (`eqx.filter_eval_shape`: no XLA compiles, no
weights), then every layer is filled by type, as torchvision's init loops do:
He-normal (fan-out) conv weights and zero conv biases, BatchNorm ones/zeros, and
Linear weights U(±1/sqrt(fan)). The numbers come from a NumPy generator seeded by the
JAX key, so building a 25M-parameter ResNet costs no per-shape compilation.
"""

import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray, PyTree


def _numpy_rng(key: PRNGKeyArray) -> np.random.Generator:
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key).ravel().tolist())


def _init_conv(conv: eqx.nn.Conv, rng: np.random.Generator) -> eqx.nn.Conv:
    fan_out = conv.weight.shape[0] * math.prod(conv.weight.shape[2:])
    weight = rng.normal(0.0, math.sqrt(2.0 / fan_out), conv.weight.shape)
    conv = eqx.tree_at(lambda c: c.weight, conv, jnp.asarray(weight, conv.weight.dtype))
    if conv.bias is not None:
        conv = eqx.tree_at(lambda c: c.bias, conv, jnp.zeros(conv.bias.shape, conv.bias.dtype))
    return conv


def _init_linear(
    linear: eqx.nn.Linear, rng: np.random.Generator, fan: Literal["in", "out"]
) -> eqx.nn.Linear:
    out_features, in_features = linear.weight.shape
    bound = 1.0 / math.sqrt(in_features if fan == "in" else out_features)
    weight = rng.uniform(-bound, bound, linear.weight.shape)
    linear = eqx.tree_at(lambda m: m.weight, linear, jnp.asarray(weight, linear.weight.dtype))
    if linear.bias is not None:
        # PyTorch's default draws the bias like the weight; torchvision's EfficientNet zeros it.
        bias = rng.uniform(-bound, bound, linear.bias.shape) if fan == "in" else 0.0
        bias = jnp.asarray(np.broadcast_to(bias, linear.bias.shape), linear.bias.dtype)
        linear = eqx.tree_at(lambda m: m.bias, linear, bias)
    return linear


def _init_batch_norm(bn: eqx.nn.BatchNorm) -> eqx.nn.BatchNorm:
    return eqx.nn.BatchNorm(
        bn.input_size,
        bn.axis_name,
        eps=bn.eps,
        channelwise_affine=bn.channelwise_affine,
        momentum=bn.momentum,
        inference=bn.inference,
        mode=bn.mode,
    )


def build(
    make_model, *args, key: PRNGKeyArray, linear_fan: Literal["in", "out"] = "in", **kwargs
) -> tuple[PyTree, eqx.nn.State]:
    """`make_model(*args, **kwargs, key=...)`, initialized as torchvision does, and its state.

    `linear_fan="in"` is PyTorch's default Linear init; `"out"` is the U(±1/sqrt(out))
    weight and zero bias that torchvision uses for EfficientNet's classifier.
    """
    abstract = eqx.filter_eval_shape(make_model, *args, key=key, **kwargs)
    rng = _numpy_rng(key)
    layer_types = (eqx.nn.Conv, eqx.nn.Linear, eqx.nn.BatchNorm)

    def init(layer):
        if isinstance(layer, eqx.nn.Conv):
            return _init_conv(layer, rng)
        if isinstance(layer, eqx.nn.Linear):
            return _init_linear(layer, rng, linear_fan)
        if isinstance(layer, eqx.nn.BatchNorm):
            return _init_batch_norm(layer)
        return layer

    model = jax.tree_util.tree_map(init, abstract, is_leaf=lambda x: isinstance(x, layer_types))
    for path, leaf in jax.tree_util.tree_leaves_with_path(model):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise TypeError(
                f"build() cannot initialize the array at {jax.tree_util.keystr(path)}: "
                "only eqx.nn.Conv, eqx.nn.Linear and eqx.nn.BatchNorm layers are "
                "supported; construct this model directly instead."
            )
    return eqx.nn.make_with_state(lambda: model)()
