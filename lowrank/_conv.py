"""The factorized twin of `eqx.nn.Conv`: a k×k conv to `rank` channels, then a 1×1 conv.

It takes exactly the inputs of the conv it replaces (unbatched, like Equinox), so it
drops into any model; users `jax.vmap` over the batch as usual.
"""

import equinox as eqx
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from ._layers import check_unstacked


class LowRankConv(eqx.Module):
    """A k×k conv to `rank` channels followed by a 1×1 conv back to `out` channels.

    `v` is the first conv's kernel (rank, in, *kernel) and carries the original
    stride, padding, dilation and padding mode; `u` (out, rank) is the 1×1 conv.
    `lowering` picks how the 1×1 stage runs: "conv" (a second `lax.conv`, the
    default: fastest in bench/model_speed.py) or "einsum" (a channel matmul).

    Args:
        u: the 1×1 conv (*stack, out, rank).
        v: the k×k conv kernel (*stack, rank, in, *kernel).
        bias: (*stack, out), or None.
        stride, padding, dilation, padding_mode: those of the dense conv.
        lowering: "conv" or "einsum".
    """

    u: Float[Array, "*stack out rank"]
    v: Float[Array, "..."]  # (*stack, rank, in, *kernel)
    bias: Float[Array, "*stack out"] | None
    num_spatial_dims: int = eqx.field(static=True)
    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)
    rank: int = eqx.field(static=True)
    kernel_size: tuple[int, ...] = eqx.field(static=True)
    stride: tuple[int, ...] = eqx.field(static=True)
    padding: str | tuple[tuple[int, int], ...] = eqx.field(static=True)
    dilation: tuple[int, ...] = eqx.field(static=True)
    padding_mode: str = eqx.field(static=True)
    lowering: str = eqx.field(static=True, default="conv")

    def __init__(
        self,
        u,
        v,
        bias=None,
        *,
        stride,
        padding,
        dilation,
        padding_mode: str = "ZEROS",
        lowering: str = "conv",
    ):
        lead = u.ndim - 2  # stack axes, shared by u, v and bias
        paired = (
            v.ndim > u.ndim
            and u.shape[:-2] == v.shape[:lead]
            and u.shape[-1:] == v.shape[lead : lead + 1]
        )
        if u.ndim < 2 or not paired:
            raise ValueError(
                f"LowRankConv needs u (*stack, out, r) and v (*stack, r, in, *kernel); got {u.shape} and {v.shape}"
            )
        if lowering not in ("einsum", "conv"):
            raise ValueError(f"lowering must be 'einsum' or 'conv', got {lowering!r}")
        if bias is not None and bias.shape != u.shape[:-1]:
            raise ValueError(f"bias must have shape {u.shape[:-1]}, got {bias.shape}")
        spatial = v.ndim - 2 - lead
        self.u, self.v, self.bias = u, v, bias
        self.out_channels, self.rank = u.shape[-2:]
        self.in_channels = v.shape[lead + 1]
        self.kernel_size = tuple(v.shape[lead + 2 :])
        self.num_spatial_dims = spatial
        self.stride = _per_dim(stride, spatial, "stride")
        self.dilation = _per_dim(dilation, spatial, "dilation")
        self.padding = _padding(padding, spatial)
        self.padding_mode = padding_mode.upper()
        if self.padding_mode not in ("ZEROS", *_NUMPY_PAD_MODES):
            raise ValueError(
                f"padding_mode must be ZEROS, REFLECT, REPLICATE or CIRCULAR, got {padding_mode!r}"
            )
        self.lowering = lowering

    @property
    def dense_shape(self) -> tuple[int, ...]:
        """The shape of one (unstacked) dense kernel."""
        return (self.out_channels, self.in_channels, *self.kernel_size)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Leading stack axes (layers built by `eqx.filter_vmap` for a scan); () if none."""
        return self.u.shape[:-2]

    @property
    def weight(self) -> Float[Array, "..."]:  # (*stack, out, in, *kernel)
        """The dense kernel u @ v this layer represents."""
        lead = self.stack_shape
        v = self.v.reshape(lead + (self.rank, -1))
        return (self.u @ v).reshape(lead + self.dense_shape)

    def with_lowering(self, lowering: str) -> "LowRankConv":
        """The same layer, running its 1×1 stage through another lowering.

        Args:
            lowering: "conv" or "einsum".

        Returns:
            A new `LowRankConv` sharing the factors and bias.
        """
        return LowRankConv(
            self.u,
            self.v,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            padding_mode=self.padding_mode,
            lowering=lowering,
        )

    def __call__(self, x: Float[Array, "in *spatial"], *, key: PRNGKeyArray | None = None):
        """Args:
            x: one (in, *spatial) input (vmap over a batch).
            key: ignored (for the `eqx.nn.Conv` signature).

        Returns:
            The (out, *spatial_out) output: the k×k conv to `rank` channels, the 1×1
            stage, plus the bias.
        """
        del key
        check_unstacked(self)
        h = _conv_forward(self, x)
        if self.lowering == "einsum":
            y = jnp.einsum("or,r...->o...", self.u, h)
        else:
            kernel = self.u.reshape(self.u.shape + (1,) * self.num_spatial_dims)
            y = lax.conv_general_dilated(h[None], kernel, (1,) * self.num_spatial_dims, "VALID")[0]
        if self.bias is not None:
            y = y + self.bias.reshape((-1,) + (1,) * self.num_spatial_dims)
        return y


_NUMPY_PAD_MODES = {"REFLECT": "reflect", "REPLICATE": "edge", "CIRCULAR": "wrap"}


def _per_dim(value, spatial: int, name: str) -> tuple[int, ...]:
    """An int or a sequence of ints, as one int per spatial dim (as eqx.nn.Conv takes them)."""
    values = (value,) * spatial if isinstance(value, int) else tuple(value)
    if len(values) != spatial:
        raise ValueError(f"{name} needs {spatial} values (one per spatial dim), got {value!r}")
    return values


def _padding(padding, spatial: int):
    """eqx.nn.Conv's padding forms: 'SAME'/'SAME_LOWER'/'VALID', an int, ints or (lo, hi) pairs."""
    if isinstance(padding, str):
        return padding.upper()
    if isinstance(padding, int):
        return ((padding, padding),) * spatial
    pads = tuple(padding)
    if len(pads) != spatial:
        raise ValueError(f"padding needs {spatial} entries (one per spatial dim), got {padding!r}")
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in pads)


def pad_for_conv(layer, x):
    """Apply a non-zero padding mode explicitly; returns (x, padding for lax.conv).

    `layer` is an `eqx.nn.Conv` or `LowRankConv` (same attribute names); `x` has the
    spatial dims last, with any leading channel/batch dims.
    """
    padding = layer.padding
    if layer.padding_mode == "ZEROS":
        return x, padding
    spatial = layer.num_spatial_dims
    if isinstance(padding, str):
        dilated = tuple(d * (k - 1) + 1 for k, d in zip(layer.kernel_size, layer.dilation))
        padding = lax.padtype_to_pads(x.shape[-spatial:], dilated, layer.stride, padding)
    lead = [(0, 0)] * (x.ndim - spatial)
    return jnp.pad(x, lead + list(padding), _NUMPY_PAD_MODES[layer.padding_mode]), "VALID"


def _conv_forward(layer: LowRankConv, x):
    """The k×k stage, with the layer's stride, padding, dilation and padding mode."""
    expected = layer.num_spatial_dims + 1
    if x.ndim != expected or x.shape[0] != layer.in_channels:
        raise ValueError(
            f"LowRankConv expects an unbatched input of shape ({layer.in_channels}, *spatial) "
            f"with {layer.num_spatial_dims} spatial dims, got {x.shape}; use jax.vmap over the batch"
        )
    x, padding = pad_for_conv(layer, x)
    return lax.conv_general_dilated(
        x[None], layer.v, window_strides=layer.stride, padding=padding, rhs_dilation=layer.dilation
    )[0]
