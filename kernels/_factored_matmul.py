"""Public entry point: act(σ(x @ a) @ b + bias) as one fused op, or as XLA's two matmuls.

σ is the optional inner activation on the rank-r intermediate (CoLA, arXiv:2502.10940),
act the optional epilogue. The fused path is a `jax.custom_vjp` whose forward and
backward are row-wise ops (`_batching.rowwise`), each dispatching per shape to a Pallas
kernel or its XLA twin: forward = `_forward.fused_forward` (also saving the
pre-activation t = x @ a, M × r), backward = `_backward.fused_epilogue_grad` for
gz = g * act'(z) and dt = (gz @ bᵀ) * σ'(t), then XLA for h = σ(t),
dx = dt @ aᵀ, da = xᵀ @ dt, db = hᵀ @ gz, dbias = Σ gz. Both kernels carry their XLA
twin's derivatives (`_xla_derivatives`), so grad-of-grad and `jax.hessian` run through
the fused path too (the kernels compute values, XLA the higher-order terms).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from . import _activations, _backward, _batching, _dispatch, _forward

IMPLS = ("auto", "xla", "pallas")
ACTIVATIONS = _activations.NAMES


def factored_matmul(
    x: Float[ArrayLike, "*batch K"],
    a: Float[ArrayLike, "K r"],
    b: Float[ArrayLike, "r N"],
    bias: Float[ArrayLike, " N"] | None = None,
    activation: str | None = None,
    impl: str = "auto",
    *,
    inner_activation: str | None = None,
) -> Float[Array, "*batch N"]:
    """act(σ(x @ a) @ b + bias) for x (..., K), a (K, r), b (r, N), bias (N,).

    `activation` (act, the epilogue) and `inner_activation` (σ, applied to the rank-r
    intermediate x @ a, as CoLA's u·σ(v·x)) are each None/"none", "relu", "gelu" (tanh
    approximation, as `jax.nn.gelu`'s default) or "silu". `impl="pallas"` forces the fused kernels
    (interpret mode on CPU), `"xla"` the two XLA matmuls, and `"auto"` picks per
    backend and shape from measurements (`_dispatch.MEASURED`), XLA where none
    favours Pallas or where a kernel cannot run (arrays sharded over Explicit mesh
    axes: `impl="pallas"` raises there). Inputs are promoted to one dtype; Pallas
    takes float32 and bfloat16, with float32 accumulation. A vmapped call runs the
    kernel on the whole batch; leading batch dims of x are flattened into rows. The
    fused path has a custom VJP: reverse mode to any order (grad of grad,
    `jax.hessian`) works on it, plain forward mode (`jax.jvp`, `jax.jacfwd` of the
    op itself) on the XLA path only.

    Args:
        x: inputs (..., K).
        a: the first factor (K, r).
        b: the second factor (r, N).
        bias: added after the second matmul, (N,), or None.
        activation: None/"none", "relu", "gelu" or "silu", applied last.
        impl: "auto", "pallas" or "xla".

    Returns:
        act((x @ a) @ b + bias), shape (..., N), in the promoted dtype.
    """
    x, a, b, bias = _checked(x, a, b, bias, activation, impl, inner_activation)
    k, n = a.shape[0], b.shape[1]
    rows = x.reshape(math.prod(x.shape[:-1]), k)
    if impl == "xla" or (impl == "auto" and not _dispatch.auto_may_use_pallas()):
        y = _xla_forward(rows, a, b, bias, activation=activation, inner=inner_activation)
    else:
        try:
            y = _fused(rows, a, b, bias, activation, inner_activation, impl)
        except TypeError as e:
            if "forward-mode autodiff" not in str(e):
                raise
            raise TypeError(
                f"factored_matmul(impl={impl!r}): forward-mode autodiff (jax.jvp, jax.jacfwd) "
                "does not run through the fused Pallas path (it has a custom VJP); use "
                "impl='xla', or reverse mode (jax.grad, jax.jacrev, jax.hessian)"
            ) from None
    return y.reshape(*x.shape[:-1], n)


def _checked(x, a, b, bias, activation, impl, inner_activation):
    """The inputs as arrays of one floating dtype, or a ValueError naming the culprit."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if activation not in _activations.NAMES:
        raise ValueError(f"activation must be one of {_activations.NAMES}, got {activation!r}")
    if inner_activation not in _activations.NAMES:
        raise ValueError(
            f"inner_activation must be one of {_activations.NAMES}, got {inner_activation!r}"
        )
    x, a, b = jnp.asarray(x), jnp.asarray(a), jnp.asarray(b)
    bias = None if bias is None else jnp.asarray(bias)
    if x.ndim < 1:
        raise ValueError(f"x must have shape (..., K) with at least one axis, got shape {x.shape}")
    k = x.shape[-1]
    if a.ndim != 2 or a.shape[0] != k:
        raise ValueError(
            f"a must have shape (K, r) = ({k}, r) to match x of shape {x.shape}, got shape {a.shape}"
        )
    r = a.shape[1]
    if b.ndim != 2 or b.shape[0] != r:
        raise ValueError(
            f"b must have shape (r, N) = ({r}, N) to match a of shape {a.shape}, got shape {b.shape}"
        )
    n = b.shape[1]
    if bias is not None and bias.shape != (n,):
        raise ValueError(
            f"bias must have shape (N,) = ({n},) to match b of shape {b.shape}, got shape {bias.shape}"
        )
    named = {"x": x, "a": a, "b": b} | ({} if bias is None else {"bias": bias})
    for name, array in named.items():
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise ValueError(
                f"{name} must have a floating dtype (float32 or bfloat16), got {array.dtype}"
            )
    dtype = jnp.result_type(*named.values())
    if impl == "pallas" and dtype not in _dispatch.PALLAS_DTYPES:
        raise ValueError(
            f"impl='pallas' takes float32 or bfloat16 inputs, got {dtype}; use impl='xla'"
        )
    return tuple(None if v is None else v.astype(dtype) for v in (x, a, b, bias))


def _xla_forward(x, a, b, bias, *, activation, inner, save_t=False):
    t = x @ a
    h = _activations.jax_nn(inner)(t)
    z = h @ b if bias is None else h @ b + bias
    y = _activations.jax_nn(activation)(z)
    return (y, t) if save_t else y


def _xla_epilogue_grad(g, t, b, bias, *, activation, inner):
    h = _activations.jax_nn(inner)(t)
    z = h @ b if bias is None else h @ b + bias
    gz = (
        g.astype(jnp.float32) * _activations.derivative(activation, z.astype(jnp.float32))
    ).astype(g.dtype)
    return gz, _times_derivative(gz @ b.T, inner, t)


def _times_derivative(dh, inner, t):
    """dh * σ'(t): the cotangent of the pre-activation intermediate (dh itself for no σ)."""
    if inner in (None, "none"):
        return dh
    return (dh.astype(jnp.float32) * _activations.derivative(inner, t.astype(jnp.float32))).astype(
        dh.dtype
    )


def _maybe(bias):
    return () if bias is None else (bias,)


def _unmaybe(bias: tuple):
    return bias[0] if bias else None


def _xla_derivatives(op, xla):
    """`op` whose values come from `op` (a Pallas kernel or XLA) and whose derivatives
    from its XLA twin `xla`: a `pallas_call` has no usable JVP of its own, and without
    this the fused forward and backward could not be differentiated again."""
    wrapped = jax.custom_jvp(op)

    @wrapped.defjvp
    def _(primals, tangents):
        return op(*primals), jax.jvp(xla, primals, tangents)[1]

    return wrapped


@functools.cache
def _forward_op(activation, inner, save_t, impl):
    def xla(x, a, b, *bias):
        return _xla_forward(
            x, a, b, _unmaybe(bias), activation=activation, inner=inner, save_t=save_t
        )

    def op(x, a, b, *bias):
        (m, k), (r, n) = x.shape, b.shape
        if _dispatch.use_pallas("fwd", impl, m, k, n, r, x.dtype, x, a, b, *bias):
            return _forward.fused_forward(
                x,
                a,
                b,
                _unmaybe(bias),
                activation=activation,
                inner_activation=inner,
                save_t=save_t,
            )
        return xla(x, a, b, *bias)

    return _xla_derivatives(_batching.rowwise(op, n_rows=1, fallback=xla), xla)


@functools.cache
def _epilogue_grad_op(activation, inner, impl, k):
    def xla(g, t, b, *bias):
        return _xla_epilogue_grad(g, t, b, _unmaybe(bias), activation=activation, inner=inner)

    def op(g, t, b, *bias):
        (m, n), r = g.shape, b.shape[0]
        if _dispatch.use_pallas("bwd", impl, m, k, n, r, g.dtype, g, t, b, *bias):
            return _backward.fused_epilogue_grad(
                g, t, b, _unmaybe(bias), activation=activation, inner_activation=inner
            )
        return xla(g, t, b, *bias)

    return _xla_derivatives(_batching.rowwise(op, n_rows=2, fallback=xla), xla)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(x, a, b, bias, activation, inner, impl):
    return _forward_op(activation, inner, False, impl)(x, a, b, *_maybe(bias))


def _fused_fwd(x, a, b, bias, activation, inner, impl):
    y, t = _forward_op(activation, inner, True, impl)(x, a, b, *_maybe(bias))
    return y, (x, a, b, bias, t)


def _fused_bwd(activation, inner, impl, residuals, g):
    x, a, b, bias, t = residuals
    if activation in (None, "none") and inner in (None, "none"):
        gz, dt = g, g @ b.T
    else:
        gz, dt = _epilogue_grad_op(activation, inner, impl, a.shape[0])(g, t, b, *_maybe(bias))
    dbias = None if bias is None else jnp.sum(gz, axis=0, dtype=jnp.float32).astype(bias.dtype)
    h = (
        _activations.apply(inner, t.astype(jnp.float32)).astype(t.dtype)
        if inner not in (None, "none")
        else t
    )
    return dt @ a.T, x.T @ dt, h.T @ gz, dbias


_fused.defvjp(_fused_fwd, _fused_bwd)
