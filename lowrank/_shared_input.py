"""`SharedInputLinear`: several Linear layers that read the same input, run as one.

Attention's q/k/v projections read one input, and so do a SwiGLU MLP's gate and up
projections. Run separately, each factorized layer multiplies the input by its own first
factor v; stacked, the first factors (and the weights of any member left dense) make
one (Σ rank, in) matrix, so the input is read once, by one matmul, and only the small
second factors u stay separate. At batch 1 (decode) every layer is a matrix-vector
product whose cost is reading its weights and launching the op, so fewer, larger ops
are what is left to win. This is an inference layout: the members' parameters are
copied into the stack, and `members` gives them back.
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._fuse import EPILOGUES
from ._layers import LowRankLinear, linear_holding


class SharedInputLinear(eqx.Module):
    """The outputs of several Linear / `LowRankLinear` layers of one input, computed with
    one matmul over their stacked first factors.

    A `LowRankLinear` member contributes its v (rank rows) to `first` and keeps its u; an
    `eqx.nn.Linear` member contributes its whole weight (out rows) and needs no second
    factor. Each member's bias, inner activation (CoLA) and epilogue apply as in the
    layer itself, so `layer(x)[i]` equals `members[i](x)` up to float rounding. It runs
    as XLA matmuls (the members' `impl` is kept only for `members`).

    Args:
        layers: the layers, all with the same `in_features` and no stack axes.

    Raises:
        ValueError: fewer than two layers, a layer of another type, stacked layers, or
            differing input widths (the message names the member).
    """

    first: Float[Array, "rows in"]
    seconds: tuple[Float[Array, "out rank"] | None, ...]
    biases: tuple[Float[Array, " out"] | None, ...]
    splits: tuple[int, ...] = eqx.field(static=True)
    activations: tuple[str | None, ...] = eqx.field(static=True)
    inner_activations: tuple[str | None, ...] = eqx.field(static=True)
    impls: tuple[str, ...] = eqx.field(static=True)

    def __init__(self, layers):
        layers = tuple(layers)
        if len(layers) < 2:
            raise ValueError(f"SharedInputLinear needs at least two layers, got {len(layers)}")
        widths = set()
        for i, layer in enumerate(layers):
            if isinstance(layer, LowRankLinear):
                if layer.stack_shape:
                    raise ValueError(
                        f"SharedInputLinear: layer {i} is stacked (stack shape "
                        f"{layer.stack_shape}); fuse one slice at a time"
                    )
            elif type(layer) is eqx.nn.Linear:
                if layer.weight.ndim != 2:
                    raise ValueError(
                        f"SharedInputLinear: layer {i} is stacked (weight shape "
                        f"{layer.weight.shape}); fuse one slice at a time"
                    )
            else:
                raise ValueError(
                    f"SharedInputLinear: layer {i} is a {type(layer).__name__}; it takes "
                    "eqx.nn.Linear and lowrank.LowRankLinear layers"
                )
            widths.add(layer.in_features)
        if len(widths) != 1:
            raise ValueError(
                "SharedInputLinear: the layers must read the same input, got in_features "
                f"{[layer.in_features for layer in layers]}"
            )
        low = [isinstance(layer, LowRankLinear) for layer in layers]
        blocks = [layer.v if lr else layer.weight for layer, lr in zip(layers, low)]
        dtype = jnp.result_type(*blocks)
        self.first = jnp.concatenate([b.astype(dtype) for b in blocks], axis=0)
        self.seconds = tuple(layer.u if lr else None for layer, lr in zip(layers, low))
        self.biases = tuple(layer.bias for layer in layers)
        self.splits = tuple(b.shape[0] for b in blocks)
        self.activations = tuple(layer.activation if lr else None for layer, lr in zip(layers, low))
        self.inner_activations = tuple(
            layer.inner_activation if lr else None for layer, lr in zip(layers, low)
        )
        self.impls = tuple(layer.impl if lr else "auto" for layer, lr in zip(layers, low))

    @property
    def members(self) -> tuple:
        """The layers this one was built from (new modules holding the same values)."""
        layers, start = [], 0
        for size, u, bias, act, inner, impl in zip(
            self.splits,
            self.seconds,
            self.biases,
            self.activations,
            self.inner_activations,
            self.impls,
        ):
            block = self.first[start : start + size]
            start += size
            if u is None:
                layers.append(linear_holding(block, bias))
            else:
                layers.append(
                    LowRankLinear(u, block, bias, impl=impl, activation=act, inner_activation=inner)
                )
        return tuple(layers)

    def __call__(
        self, x: Float[Array, " in"], *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, " out"], ...]:
        """Args:
            x: one (in,) input vector (vmap over a batch).
            key: ignored (for the `eqx.nn.Linear` signature).

        Returns:
            Each member's (out,) output, in the order of `layers`.
        """
        del key
        if x.shape != (self.first.shape[1],):
            raise ValueError(
                f"SharedInputLinear expects an unbatched input of shape ({self.first.shape[1]},), "
                f"got {x.shape}; use jax.vmap over the batch"
            )
        hidden = self.first @ x.astype(self.first.dtype)
        outputs, start = [], 0
        for size, u, bias, act, inner in zip(
            self.splits, self.seconds, self.biases, self.activations, self.inner_activations
        ):
            y = hidden[start : start + size]
            start += size
            if u is not None:
                y = u @ _act(inner)(y)
            if bias is not None:
                y = y + bias
            outputs.append(_act(act)(y))
        return tuple(outputs)


def _act(name: str | None):
    """The jax.nn function of a kernel activation name (None: the identity)."""
    return (lambda z: z) if name is None else EPILOGUES[name]
