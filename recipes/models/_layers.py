"""Building blocks shared by the vision models: padded convs, BatchNorm, conv-BN-act,
stages of blocks, the pooled classifier head, drop-path."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

BATCH_AXIS = "batch"
"""The vmap axis name BatchNorm averages over: run models under
`jax.vmap(model, axis_name=BATCH_AXIS, in_axes=(0, None), out_axes=(0, None))`."""

Image = Float[Array, "c h w"]
"""One unbatched (channels, height, width) image or feature map."""
Logits = Float[Array, " classes"]
"""One example's class scores."""


def conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    groups: int = 1,
    use_bias: bool = False,
    padding: str | None = None,
    key: PRNGKeyArray,
) -> eqx.nn.Conv2d:
    """A plain `eqx.nn.Conv2d` with "same" padding for odd kernels (no bias by default,
    since a BatchNorm follows): (k - 1) // 2 pixels on every side as PyTorch models pad,
    or `padding="SAME"` for TensorFlow's rule (which puts the odd pixel of a strided
    conv at the bottom/right, as TF-trained weights expect)."""
    return eqx.nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=(kernel_size - 1) // 2 if padding is None else padding,
        groups=groups,
        use_bias=use_bias,
        key=key,
    )


def batch_norm(channels: int, *, eps: float = 1e-5) -> eqx.nn.BatchNorm:
    """BatchNorm over the `BATCH_AXIS` vmap axis with batch statistics in training and
    running statistics (PyTorch momentum 0.1) at inference."""
    return eqx.nn.BatchNorm(channels, axis_name=BATCH_AXIS, eps=eps, momentum=0.9, mode="batch")


def apply_norm(
    bn: eqx.nn.BatchNorm, x: Float[Array, "c h w"], state: eqx.nn.State, inference: bool | None
) -> tuple[Float[Array, "c h w"], eqx.nn.State]:
    """`bn(x, state)` in x's dtype: at inference eqx's BatchNorm mixes in float32
    running statistics, which would otherwise promote bf16 activations to float32."""
    y, state = bn(x, state, inference=inference)
    return y.astype(x.dtype), state


class ConvBNAct(eqx.Module):
    """Conv, BatchNorm, then an optional activation (swish unless told otherwise).
    `padding` and `eps` follow `conv2d` and `batch_norm` (TF-trained weights want
    padding="SAME" and eps=1e-3)."""

    conv: eqx.nn.Conv2d
    bn: eqx.nn.BatchNorm
    activation: Callable[[Array], Array] | None = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        groups: int = 1,
        activation: Callable[[Array], Array] | None = jax.nn.silu,
        padding: str | None = None,
        eps: float = 1e-5,
        key: PRNGKeyArray,
    ):
        self.conv = conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            groups=groups,
            padding=padding,
            key=key,
        )
        self.bn = batch_norm(out_channels, eps=eps)
        self.activation = activation

    def __call__(self, x, state, *, inference=None):
        x, state = apply_norm(self.bn, self.conv(x), state, inference)
        if self.activation is not None:
            x = self.activation(x)
        return x, state


class Stage(eqx.Module):
    """A run of blocks at one width or resolution (only the first strides or widens),
    each `block(x, state, inference=...) -> (x, state)`, applied in order."""

    blocks: tuple[eqx.Module, ...]

    def __call__(self, x, state, *, inference=None):
        for block in self.blocks:
            x, state = block(x, state, inference=inference)
        return x, state


def pooled_logits(
    model: eqx.Module,
    x: Image,
    state: eqx.nn.State,
    *,
    key: PRNGKeyArray | None,
    inference: bool | None,
) -> tuple[Logits, eqx.nn.State]:
    """The classifier end of MobileNet-style networks: `model.head` (a ConvBNAct),
    global average pool, `model.dropout`, then `model.classifier`.

    Args:
        model: a network with `head`, `dropout` and `classifier` layers.
        x: the last stage's (C, H, W) features.
        state: the BatchNorm state.
        key: the dropout key (training mode only).
        inference: as the model's `inference` argument.

    Returns:
        (logits, state).
    """
    x, state = model.head(x, state, inference=inference)
    x = model.dropout(jnp.mean(x, axis=(1, 2)), key=key, inference=inference)
    return model.classifier(x), state


class StochasticDepth(eqx.Module):
    """Drops the whole residual branch of one example with probability `p` during
    training (and rescales it by 1/(1-p) otherwise); the identity at inference.

    Attributes:
        p: the drop probability.
        inference: the default mode when `__call__` gets `inference=None`.
    """

    p: float = eqx.field(static=True)
    inference: bool = False

    def __call__(
        self,
        x: Float[Array, "..."],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "..."]:
        """Args:
            x: one example's residual branch.
            key: draws the drop (required in training mode when p > 0).
            inference: identity when True (None: `self.inference`).

        Returns:
            `x`, zeros, or x / (1 - p).
        """
        if inference is None:
            inference = self.inference
        if inference or self.p == 0.0:
            return x
        if key is None:
            raise RuntimeError(
                "StochasticDepth needs a `key` in training mode; pass key=... or run "
                "with inference=True (eqx.nn.inference_mode)."
            )
        keep = jax.random.bernoulli(key, 1.0 - self.p)
        return jnp.where(keep, x / (1.0 - self.p), jnp.zeros_like(x))
