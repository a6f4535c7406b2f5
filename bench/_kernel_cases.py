"""What bench/kernels.py runs: the dense and factored functions with their random
inputs, and the correctness check of every path against a float64 reference."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

import kernels

from ._results import markdown_table

ACTIVATION = "gelu"


def inputs(m, k, n, r, dtype, seed=0):
    """x, a, b, w, bias and the output cotangent g, random, for an M×K×r×N case."""
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (m, k), dtype)
    a = (jax.random.normal(ks[1], (k, r)) / np.sqrt(k)).astype(dtype)
    b = (jax.random.normal(ks[2], (r, n)) / np.sqrt(r)).astype(dtype)
    w = (jax.random.normal(ks[3], (k, n)) / np.sqrt(k)).astype(dtype)
    bias = (jax.random.normal(ks[4], (n,)) / 2).astype(dtype)
    g = jax.random.normal(ks[5], (m, n), dtype)
    return x, a, b, w, bias, g


def with_vjp(f):
    """`f` and its vjp as one jitted function of (*primals, cotangent)."""

    def run(*args):
        *primals, g = args
        y, vjp = jax.vjp(f, *primals)
        return y, vjp(g)

    return jax.jit(run)


def dense(x, w, bias):
    """The dense path: act(x @ w + bias)."""
    return jax.nn.gelu(x @ w + bias)


def factored(impl):
    """The factored path through `kernels.factored_matmul` with `impl`."""
    return lambda x, a, b, bias: kernels.factored_matmul(x, a, b, bias, ACTIVATION, impl)


def _reference(x, a, b, bias, g):
    """Forward and vjp in float64 on the CPU."""
    cpu = jax.devices("cpu")[0]
    with jax.enable_x64(True), jax.default_device(cpu):
        args = [jnp.asarray(np.asarray(v, np.float64)) for v in (x, a, b, bias, g)]
        f = lambda x, a, b, bias: jax.nn.gelu((x @ a) @ b + bias)
        y, vjp = jax.vjp(f, *args[:4])
        return [np.asarray(v) for v in (y, *vjp(args[4]))]


def _rel_err(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


def check(shapes, dtypes) -> tuple[str, bool]:
    """Pallas and XLA vs a float64 reference: forward and every gradient."""
    names = ["y", "dx", "da", "db", "dbias"]
    rows, ok = [], True
    for (m, k, r, n), dtype in itertools.product(shapes, dtypes):
        x, a, b, _, bias, g = inputs(m, k, n, r, dtype, seed=1)
        want = _reference(x, a, b, bias, g)
        outs = {}
        for impl in ("xla", "pallas"):
            y, grads = with_vjp(factored(impl))(x, a, b, bias, g)
            outs[impl] = [y, *grads]
        floor = 2e-2 if dtype == jnp.bfloat16 else 5e-3  # bf16 rounding; TF32 on GPU
        for name, got_x, got_p, w in zip(names, outs["xla"], outs["pallas"], want):
            e_x, e_p = _rel_err(got_x, w), _rel_err(got_p, w)
            good = e_p <= max(2 * e_x, floor)
            ok &= good
            rows.append(
                [
                    f"{m}x{k}x{r}x{n}",
                    jnp.dtype(dtype).name,
                    name,
                    e_x,
                    e_p,
                    "ok" if good else "FAIL",
                ]
            )
    table = markdown_table(
        ["M×K×r×N", "dtype", "output", "XLA rel. err", "Pallas rel. err", ""], rows
    )
    return table, ok
