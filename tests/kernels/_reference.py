"""Float64 references and data for the kernel tests (independent of kernels/)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Edge tiles are masked in the memory ops (Triton, interpret) or in the values (TPU);
# the TPU style reads past the array, which only interpret mode and Mosaic TPU allow.
UNMASKED_EDGES_OK = pytest.mark.skipif(
    jax.default_backend() not in ("cpu", "tpu"),
    reason="unmasked edge reads need interpret mode or TPU",
)

JAX_NN = {
    None: lambda z: z,
    "none": lambda z: z,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
}


def factors(m, k, r, n, *, bias=True, seed=0, dtype=np.float32):
    """x (m, k), a (k, r), b (r, n), bias (n,) or None, scaled so z = t @ b + bias is O(1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k))
    a = rng.standard_normal((k, r)) / np.sqrt(k)
    b = rng.standard_normal((r, n)) / np.sqrt(r)
    out = [jnp.asarray(v, dtype) for v in (x, a, b)]
    return (*out, jnp.asarray(rng.standard_normal(n) / 2, dtype) if bias else None)


def forward_and_vjp(x, a, b, bias, activation, g):
    """act((x @ a) @ b + bias) and its vjp with cotangent g, by autodiff in float64."""
    act = JAX_NN[activation]
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(v, np.float64)) for v in (x, a, b)]
        if bias is None:
            y, vjp = jax.vjp(lambda x, a, b: act((x @ a) @ b), *args)
            grads = (*vjp(jnp.asarray(np.asarray(g, np.float64))), None)
        else:
            args.append(jnp.asarray(np.asarray(bias, np.float64)))
            y, vjp = jax.vjp(lambda x, a, b, c: act((x @ a) @ b + c), *args)
            grads = vjp(jnp.asarray(np.asarray(g, np.float64)))
        return np.asarray(y), [None if v is None else np.asarray(v) for v in grads]


def assert_close(got, want, tol):
    """max |got - want| <= tol * max |want| (relative to the scale of the reference)."""
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    err, scale = np.abs(got - want).max(initial=0.0), np.abs(want).max(initial=0.0)
    assert err <= tol * max(scale, 1e-30), f"max error {err:.3g} > {tol} * {scale:.3g}"


_C, _A = math.sqrt(2.0 / math.pi), 0.044715


def np_act(name, z):
    """(act(z), act'(z)) in float64 numpy, written out (independent of kernels/ and jax.nn)."""
    if name is None:
        return z, np.ones_like(z)
    if name == "relu":
        return np.maximum(z, 0.0), (z > 0).astype(z.dtype)
    if name == "silu":
        s = 1.0 / (1.0 + np.exp(-z))
        return z * s, s * (1.0 + z * (1.0 - s))
    th = np.tanh(_C * (z + _A * z**3))  # gelu, tanh approximation
    return 0.5 * z * (1.0 + th), 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th**2) * _C * (
        1.0 + 3.0 * _A * z**2
    )


def np_reference(x, a, b, bias, inner, activation, g):
    """act(σ(x @ a) @ b + bias) and its (dx, da, db, dbias) for cotangent g, by
    hand-written float64 backprop (σ = `inner`)."""
    x, a, b, g = (np.asarray(v, np.float64) for v in (x, a, b, g))
    t = x @ a
    h, dh_dt = np_act(inner, t)
    z = h @ b + (0.0 if bias is None else np.asarray(bias, np.float64))
    y, dy_dz = np_act(activation, z)
    gz = g * dy_dz
    dt = (gz @ b.T) * dh_dt
    return y, (dt @ a.T, x.T @ dt, h.T @ gz, None if bias is None else gz.sum(0))
