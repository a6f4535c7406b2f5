"""Building blocks shared by the vision models: padded convs, BatchNorm, drop-path."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

BATCH_AXIS = "batch"
"""The vmap axis name BatchNorm averages over: run models under
`jax.vmap(model, axis_name=BATCH_AXIS, in_axes=(0, None), out_axes=(0, None))`."""


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


class StochasticDepth(eqx.Module):
    """Drops the whole residual branch of one example with probability `p` during
    training (and rescales it by 1/(1-p) otherwise); the identity at inference."""

    p: float = eqx.field(static=True)
    inference: bool = False

    def __call__(
        self,
        x: Float[Array, "..."],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "..."]:
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
