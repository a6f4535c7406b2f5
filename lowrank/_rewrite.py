"""Rewrite: factorized twins of dense layers and back (`densify`); kernel swaps."""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._conv import LowRankConv
from ._fuse import unfuse_epilogues
from ._initializers import Factors
from ._layers import LowRankLinear, linear_holding
from ._select import check_is_model, replace_layers, stack_shape, walk_layers
from ._shared_input import SharedInputLinear


def densify(model):
    """Merge every factorized layer back into a plain `eqx.nn.Linear` / `eqx.nn.Conv`.

    Args:
        model: an Equinox model (never modified).

    Returns:
        The model with each `LowRankLinear` / `LowRankConv` replaced by the dense layer
        of weight u @ v (stacked layers stay stacked); an activation `factorize` fused
        into a layer (`fuse_activations`) goes back to its `eqx.nn.MLP` or
        `eqx.nn.Lambda`, so the model computes the same function. A
        `SharedInputLinear` stays one, its factorized members merged.
    """
    check_is_model(model, "densify")
    model = unfuse_epilogues(model)
    shared = lambda x: isinstance(x, SharedInputLinear)
    model = jax.tree.map(
        lambda x: SharedInputLinear(densify(x.members)) if shared(x) else x, model, is_leaf=shared
    )
    for path, layer in walk_layers(model):
        if getattr(layer, "activation", None) or getattr(layer, "inner_activation", None):
            raise ValueError(
                f"densify: layer {path} carries activation={layer.activation!r}, "
                f"inner_activation={layer.inner_activation!r}, which a dense Linear cannot hold; "
                "rebuild it as LowRankLinear(u, v, bias) without them first"
            )
    replacements = {
        path: dense_twin(layer)
        for path, layer in walk_layers(model)
        if isinstance(layer, (LowRankLinear, LowRankConv))
    }
    return replace_layers(model, replacements)


def stacked_twin(layer, factors: Sequence[Factors]):
    """The factorized twin of a stacked layer (weights (*stack, out, in[, *kernel])), from
    one `Factors` per slice in `np.ndindex(stack)` order: u (*stack, out, r) and
    v (*stack, r, in[, *kernel]), one rank for the whole stack."""
    lead = stack_shape(layer)
    if len(factors) != int(np.prod(lead)):
        raise ValueError(
            f"a stack of shape {lead} needs {int(np.prod(lead))} Factors, got {len(factors)}"
        )

    def stack(arrays):
        return np.stack([np.asarray(a) for a in arrays]).reshape(lead + np.shape(arrays[0]))

    bias = None if factors[0].bias is None else stack([f.bias for f in factors])
    return lowrank_twin(
        layer, Factors(stack([f.u for f in factors]), stack([f.v for f in factors]), bias)
    )


def lowrank_twin(layer, factors: Factors):
    """The factorized layer, in the dense layer's dtype (host-side casts: no per-shape compile)."""
    dtype = layer.weight.dtype
    cast = lambda a, shape=None: jnp.asarray(np.asarray(a).reshape(shape or a.shape), dtype)
    u = cast(factors.u)
    bias = None if factors.bias is None else cast(factors.bias)
    if isinstance(layer, eqx.nn.Linear):
        return LowRankLinear(u, cast(factors.v), bias)
    v = cast(factors.v, factors.v.shape[:-1] + layer.weight.shape[factors.v.ndim - 1 :])
    return LowRankConv(
        u,
        v,
        bias,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        padding_mode=layer.padding_mode,
    )


_CONV_TYPES = {1: eqx.nn.Conv1d, 2: eqx.nn.Conv2d, 3: eqx.nn.Conv3d}


def dense_twin(layer):
    """The plain eqx layer computing what a factorized layer does (weight u @ v)."""
    if isinstance(layer, LowRankLinear):
        return linear_holding(layer.weight, layer.bias)
    key = jax.random.key(0)  # the fresh layer's own init is overwritten at once
    dtype = layer.u.dtype
    use_bias = layer.bias is not None
    dense = _CONV_TYPES[layer.num_spatial_dims](
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        use_bias=use_bias,
        padding_mode=layer.padding_mode,
        dtype=dtype,
        key=key,
    )
    dense = eqx.tree_at(lambda l: l.weight, dense, layer.weight)
    if use_bias:
        dense = eqx.tree_at(
            lambda l: l.bias, dense, layer.bias.reshape(layer.stack_shape + dense.bias.shape)
        )
    return dense


def with_kernels(model, *, impl: str | None = None, lowering: str | None = None):
    """A copy of `model` whose factorized layers use another kernel `impl` / conv `lowering`.

    Args:
        model: a model with `LowRankLinear` / `LowRankConv` layers (never modified).
        impl: the `kernels.factored_matmul` implementation of every LowRankLinear
            ("auto", "pallas", "xla"); None keeps each layer's.
        lowering: the 1×1 stage of every LowRankConv ("conv" or "einsum"); None keeps it.

    Returns:
        The model with those layers swapped; everything else shared.
    """

    def swap(layer):
        if impl is not None and isinstance(layer, LowRankLinear):
            return layer.with_impl(impl)
        if lowering is not None and isinstance(layer, LowRankConv):
            return layer.with_lowering(lowering)
        return layer

    is_lowrank = lambda x: isinstance(x, (LowRankLinear, LowRankConv))
    return jax.tree_util.tree_map(swap, model, is_leaf=is_lowrank)
