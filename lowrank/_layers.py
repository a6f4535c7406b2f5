"""The factorized twin of `eqx.nn.Linear`: W ~= u @ v, run by `kernels.factored_linear`.

It takes exactly the inputs of the layer it replaces (unbatched, like Equinox), so it
drops into any model; users `jax.vmap` over the batch as usual.
"""

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

import kernels


class LowRankLinear(eqx.Module):
    """y = act(u @ σ(v @ x) + bias), the rank-r replacement of an `eqx.nn.Linear`.

    Runs through `kernels.factored_linear` (`factored_matmul` for factors in this
    layout), which fuses both matmuls, the bias and the activations. `activation` (act, default None) is an epilogue: the layer then computes
    act(layer(x)) in one op, for a layer that an activation follows (`factorize` sets it
    where it can drop that activation from the model: `fuse_activations`). `inner_activation`
    (σ, default None) acts on the rank-r intermediate, CoLA's u·σ(v·x)
    (arXiv:2502.10940), a layer for training from scratch: with it the layer is no
    longer linear, and `weight` no longer its function. Each is None, "relu", "gelu"
    (tanh approximation) or "silu".

    Args:
        u: the left factor (*stack, out, rank).
        v: the right factor (*stack, rank, in).
        bias: (*stack, out), or None.
        impl: the `kernels.factored_matmul` implementation ("auto", "pallas", "xla").
        activation: the fused epilogue, or None.
        inner_activation: σ on the rank-r intermediate (CoLA), or None.
    """

    u: Float[Array, "*stack out rank"]
    v: Float[Array, "*stack rank in"]
    bias: Float[Array, "*stack out"] | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    rank: int = eqx.field(static=True)
    impl: str = eqx.field(static=True, default="auto")
    activation: str | None = eqx.field(static=True, default=None)
    inner_activation: str | None = eqx.field(static=True, default=None)

    def __init__(
        self,
        u,
        v,
        bias=None,
        *,
        impl: str = "auto",
        activation: str | None = None,
        inner_activation: str | None = None,
    ):
        if impl not in kernels.IMPLS:
            raise ValueError(f"impl must be one of {kernels.IMPLS}, got {impl!r}")
        for name, value in (("activation", activation), ("inner_activation", inner_activation)):
            if value not in kernels.ACTIVATIONS:
                raise ValueError(
                    f"LowRankLinear: {name} must be one of {kernels.ACTIVATIONS}, got {value!r}"
                )
        paired = (
            v.ndim == u.ndim and u.shape[:-2] == v.shape[:-2] and u.shape[-1:] == v.shape[-2:-1]
        )
        if u.ndim < 2 or not paired:
            raise ValueError(
                f"LowRankLinear needs u (*stack, out, r) and v (*stack, r, in); got {u.shape} and {v.shape}"
            )
        if bias is not None and bias.shape != u.shape[:-1]:
            raise ValueError(f"bias must have shape {u.shape[:-1]}, got {bias.shape}")
        self.u, self.v, self.bias = u, v, bias
        self.out_features, self.rank = u.shape[-2:]
        self.in_features = v.shape[-1]
        self.impl = impl
        self.activation = None if activation == "none" else activation
        self.inner_activation = None if inner_activation == "none" else inner_activation

    def with_impl(self, impl: str) -> "LowRankLinear":
        """The same layer, run by another `kernels.factored_matmul` implementation.

        Args:
            impl: "auto", "pallas" or "xla".

        Returns:
            A new `LowRankLinear` sharing the factors and bias.
        """
        return LowRankLinear(
            self.u,
            self.v,
            self.bias,
            impl=impl,
            activation=self.activation,
            inner_activation=self.inner_activation,
        )

    @property
    def dense_shape(self) -> tuple[int, int]:
        """The shape of one (unstacked) dense weight."""
        return (self.out_features, self.in_features)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Leading stack axes (layers built by `eqx.filter_vmap` for a scan); () if none."""
        return self.u.shape[:-2]

    @property
    def weight(self) -> Float[Array, "*stack out in"]:
        """The dense weight u @ v this layer represents (its function only without
        `inner_activation`; `activation` applies after it)."""
        return self.u @ self.v

    def __call__(
        self, x: Float[Array, " in"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " out"]:
        """Args:
            x: one (in,) input vector (vmap over a batch).
            key: ignored (for the `eqx.nn.Linear` signature).

        Returns:
            The (out,) output act(u @ σ(v @ x) + bias).
        """
        del key
        check_unstacked(self)
        if x.shape != (self.in_features,):
            raise ValueError(
                f"LowRankLinear expects an unbatched input of shape ({self.in_features},), "
                f"got {x.shape}; use jax.vmap over the batch"
            )
        return kernels.factored_linear(
            x,
            self.v,
            self.u,
            self.bias,
            activation=self.activation,
            impl=self.impl,
            inner_activation=self.inner_activation,
        )


def check_unstacked(layer) -> None:
    if layer.stack_shape:
        raise ValueError(
            f"this {type(layer).__name__} is stacked (stack shape {layer.stack_shape}): call "
            "one slice at a time, e.g. jax.lax.scan over the stack or eqx.filter_vmap"
        )


def linear_holding(weight, bias) -> eqx.nn.Linear:
    """An `eqx.nn.Linear` whose weight (*stack, out, in) and bias (*stack, out) or None
    are the given arrays (its own initialization is overwritten at once)."""
    out, inp = weight.shape[-2:]
    layer = eqx.nn.Linear(inp, out, bias is not None, dtype=weight.dtype, key=jax.random.key(0))
    return eqx.tree_at(
        lambda l: (l.weight, l.bias), layer, (weight, bias), is_leaf=lambda x: x is None
    )
