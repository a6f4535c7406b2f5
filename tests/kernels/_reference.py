"""Float64 references and data for the kernel tests (independent of kernels/)."""

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
