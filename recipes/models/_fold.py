"""Fold inference BatchNorm into the conv before it: one conv (with a bias) instead of two ops.

At inference a BatchNorm is a per-channel affine map, y = s * x + c. After a conv
(W, b) it becomes the conv (s * W, s * b + c); after a factorized conv (v, then the 1x1
stage u) only u and the bias change, to s * u and s * b + c. `fold_batchnorm` does that
for every conv → BatchNorm pair of the recipes' vision models (the `PAIRS` table) and
replaces each folded BatchNorm by `FoldedBatchNorm`, which passes activations and the
state through, so the folded model keeps its `model(x, state, ...)` signature.
"""

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import lowrank

from ._layers import ConvBNAct
from ._resnet import BasicBlock, Bottleneck, Downsample, ResNet

PAIRS: dict[type, tuple[tuple[str, str], ...]] = {
    ConvBNAct: (("conv", "bn"),),
    Downsample: (("conv", "bn"),),
    BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    ResNet: (("conv1", "bn1"),),
}
"""(conv attribute, BatchNorm attribute) pairs per module type, where the module applies
that BatchNorm directly to that conv's output."""


class FoldedBatchNorm(eqx.Module):
    """A BatchNorm already folded into the preceding conv: the identity, state passed on."""

    def __call__(
        self, x: Float[Array, "c ..."], state: eqx.nn.State, *, inference: bool | None = None
    ) -> tuple[Float[Array, "c ..."], eqx.nn.State]:
        """Args:
            x: the folded conv's output.
            state: the BatchNorm state, passed on unchanged.
            inference: ignored.

        Returns:
            (x, state) unchanged.
        """
        del inference
        return x, state


def fold_batchnorm(model: eqx.Module, state: eqx.nn.State) -> eqx.Module:
    """An inference copy of `model` with every BatchNorm folded into the conv before it.

    Args:
        model: a recipes vision model (ResNet, MobileNetV2, EfficientNet, EfficientNet-Lite
            or one of their blocks), dense or factorized by `lowrank` (a `LowRankConv`'s
            1x1 stage absorbs the BatchNorm).
        state: its BatchNorm state; the running statistics at inference are folded.

    Returns:
        The folded model. It is for inference only (the BatchNorms are gone, so it
        cannot train them); call it as before, with the same state.
    """
    pairs = _pairs(model, ())
    if not pairs:
        raise ValueError(
            f"fold_batchnorm found no conv → BatchNorm pair in this {type(model).__name__}; "
            f"it folds the pairs of {', '.join(t.__name__ for t in PAIRS)} (recipes.models)"
        )
    convs = [_folded_conv(_get(model, c), _get(model, b), state, c) for c, b in pairs]
    where = lambda m: [_get(m, p) for pair in pairs for p in pair]
    return eqx.tree_at(where, model, [x for conv in convs for x in (conv, FoldedBatchNorm())])


def _pairs(node, path: tuple) -> list[tuple[tuple, tuple]]:
    """(conv path, BatchNorm path) of every pair in `node`, depth first."""
    found = []
    if isinstance(node, eqx.Module):
        for conv, bn in PAIRS.get(type(node), ()):
            if isinstance(getattr(node, bn), eqx.nn.BatchNorm):
                found.append((path + (conv,), path + (bn,)))
        for field in dataclasses.fields(node):
            found += _pairs(getattr(node, field.name, None), path + (field.name,))
    elif isinstance(node, (list, tuple)):
        for i, child in enumerate(node):
            found += _pairs(child, path + (i,))
    return found


def _get(tree, path: tuple):
    step = lambda node, key: node[key] if isinstance(key, int) else getattr(node, key)
    return functools.reduce(step, path, tree)


def _affine(bn: eqx.nn.BatchNorm, state: eqx.nn.State, channels: int):
    """(scale, shift) of `bn` at inference: its output on probes 0 and 1 (whatever its
    mode, eps or debiasing, the map is y = scale * x + shift per channel)."""
    probe = jnp.stack([jnp.zeros((channels, 1, 1)), jnp.ones((channels, 1, 1))])
    out = jax.vmap(lambda x: bn(x, state, inference=True)[0], axis_name=bn.axis_name)(probe)
    shift = out[0, :, 0, 0]
    return out[1, :, 0, 0] - shift, shift


def _folded_conv(conv, bn, state, path):
    if not isinstance(conv, (lowrank.LowRankConv, eqx.nn.Conv)):
        raise TypeError(
            f"fold_batchnorm: {'.'.join(map(str, path))} is a {type(conv).__name__}, not a conv "
            "(eqx.nn.Conv or lowrank.LowRankConv); fold before replacing it"
        )
    scale, shift = _affine(bn, state, conv.out_channels)
    dtype = conv.u.dtype if isinstance(conv, lowrank.LowRankConv) else conv.weight.dtype
    scale, shift = scale.astype(dtype), shift.astype(dtype)
    bias = shift if conv.bias is None else conv.bias.reshape(-1) * scale + shift
    if isinstance(conv, lowrank.LowRankConv):
        return eqx.tree_at(
            lambda c: (c.u, c.bias),
            conv,
            (conv.u * scale[:, None], bias),
            is_leaf=lambda x: x is None,
        )
    folded = eqx.nn.Conv(
        conv.num_spatial_dims,
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        use_bias=True,
        padding_mode=conv.padding_mode,
        dtype=dtype,
        key=jax.random.key(0),
    )
    weight = conv.weight * scale.reshape((-1,) + (1,) * conv.num_spatial_dims + (1,))
    return eqx.tree_at(
        lambda c: (c.weight, c.bias), folded, (weight, bias.reshape(folded.bias.shape))
    )
