"""`factored_linear`: `factored_matmul` for factors stored as a Linear stores its weight.

A low-rank layer keeps v (r, K) and u (N, r), so that u @ v is its (N, K) weight. Handing
those to `factored_matmul` as vᵀ and uᵀ costs nothing on the Pallas path, but on XLA:CPU
the transposed operands are materialized as copies on every call: inside a decode loop,
XLA:CPU copied every factor of every layer at every step, and compressed SmolLM2 decoded
slower than dense (measured in bench/llm_speed.py). On the XLA path this op therefore
contracts the factors as stored, with the weight on the left as `eqx.nn.Linear` does.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from . import _activations, _dispatch
from ._factored_matmul import _checked, factored_matmul


def factored_linear(
    x: Float[ArrayLike, "*batch K"],
    v: Float[ArrayLike, "r K"],
    u: Float[ArrayLike, "N r"],
    bias: Float[ArrayLike, " N"] | None = None,
    activation: str | None = None,
    impl: str = "auto",
    *,
    inner_activation: str | None = None,
) -> Float[Array, "*batch N"]:
    """act(u @ σ(v @ x) + bias), the same op as `factored_matmul(x, vᵀ, uᵀ, ...)`.

    Args:
        x: inputs (..., K).
        v: the first factor (r, K), as a low-rank layer stores it.
        u: the second factor (N, r).
        bias: (N,), or None.
        activation: the epilogue act: None/"none", "relu", "gelu" or "silu".
        impl: "auto", "pallas" or "xla", as for `factored_matmul`.
        inner_activation: σ on the rank-r intermediate (CoLA), or None.

    Returns:
        act(u @ σ(v @ x) + bias), shape (..., N).
    """
    x, v, u = jnp.asarray(x), jnp.asarray(v), jnp.asarray(u)
    if v.ndim != 2 or u.ndim != 2 or u.shape[1] != v.shape[0]:
        raise ValueError(
            f"factored_linear takes v (r, K) and u (N, r), got v {v.shape} and u {u.shape}"
        )
    if x.ndim < 1 or x.shape[-1] != v.shape[1]:
        raise ValueError(
            f"x must have shape (..., K) = (..., {v.shape[1]}) to match v of shape {v.shape}, "
            f"got shape {x.shape}"
        )
    if not (impl == "xla" or (impl == "auto" and not _dispatch.auto_may_use_pallas())):
        return factored_matmul(
            x, v.T, u.T, bias, activation, impl, inner_activation=inner_activation
        )
    # factored_matmul's checks and dtype promotion, traced abstractly: no transposed
    # operands reach the program.
    checked = jax.eval_shape(
        lambda x, v, u, bias: _checked(x, v.T, u.T, bias, activation, impl, inner_activation),
        x,
        v,
        u,
        bias,
    )
    dtype = checked[0].dtype
    bias = None if bias is None else jnp.asarray(bias, dtype)
    return _stored_layout(
        x.astype(dtype), v.astype(dtype), u.astype(dtype), bias, activation, inner_activation
    )


def _stored_layout(x, v, u, bias, activation, inner):
    batch = x.ndim - 1
    t = jax.lax.dot_general(v, x, (((1,), (batch,)), ((), ())))  # (r, *batch)
    z = jax.lax.dot_general(u, _activations.jax_nn(inner)(t), (((1,), (0,)), ((), ())))
    z = jnp.moveaxis(z, 0, -1)  # (*batch, N); free for one unbatched vector
    if bias is not None:
        z = z + bias
    return _activations.jax_nn(activation)(z)
