"""The fused forward kernel: act(σ(x @ a) @ b + bias) with x @ a kept on chip.

Each program owns `bm` rows of x. It accumulates t = x @ a over K in float32
(bm × r stays in registers / VMEM), casts t to the compute dtype, applies the inner
activation h = σ(t) there (CoLA; h = t without one), then walks its share of the N
columns: z = h @ b + bias, y = act(z), one `bn`-wide tile at a time. Only x,
the weights and y touch main memory; with `save_t` the kernel also writes the
pre-activation t (M × r, small) for the backward pass.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from . import _activations, _dispatch, _tiling


def _forward_kernel(
    x_ref,
    a_ref,
    b_ref,
    *refs,
    m,
    k,
    n,
    r,
    tiles,
    chunks,
    activation,
    inner_activation,
    has_bias,
    save_t,
    masked_ops,
):
    bias_ref = refs[0] if has_bias else None
    y_ref, *t_ref = refs[int(has_bias) :]
    bm, bk, bn, r_pad = tiles.bm, tiles.bk, tiles.bn, tiles.r_pad
    i, j = pl.program_id(0), pl.program_id(1)
    rows_ok = (i * bm + jnp.arange(bm) < m)[:, None]

    def k_step(s, acc):
        cols = s * bk + jnp.arange(bk)
        xs = _tiling.load(
            x_ref.at[:, pl.ds(s * bk, bk)], rows_ok & (cols < k)[None, :], masked_ops=masked_ops
        )
        return acc + jnp.dot(xs, a_ref[pl.ds(s * bk, bk), :], preferred_element_type=jnp.float32)

    t = jax.lax.fori_loop(0, pl.cdiv(k, bk), k_step, jnp.zeros((bm, r_pad), jnp.float32))
    t = t.astype(b_ref.dtype)
    if save_t:

        @pl.when(j == 0)
        def _():
            _tiling.store(
                t_ref[0], t, rows_ok & (jnp.arange(r_pad) < r)[None, :], masked_ops=masked_ops
            )

    if inner_activation not in (None, "none"):
        t = _activations.apply(inner_activation, t.astype(jnp.float32)).astype(b_ref.dtype)

    def n_step(c, carry):
        start = (j * chunks + c) * bn
        z = jnp.dot(t, b_ref[:, pl.ds(start, bn)], preferred_element_type=jnp.float32)
        if has_bias:
            z = z + bias_ref[:, pl.ds(start, bn)].astype(jnp.float32)
        cols_ok = (start + jnp.arange(bn) < n)[None, :]
        _tiling.store(
            y_ref.at[:, pl.ds(c * bn, bn)],
            _activations.apply(activation, z),
            rows_ok & cols_ok,
            masked_ops=masked_ops,
        )
        return carry

    jax.lax.fori_loop(0, chunks, n_step, 0)


def fused_forward(
    x: Float[Array, "M K"],
    a: Float[Array, "K r"],
    b: Float[Array, "r N"],
    bias: Float[Array, " N"] | None,
    *,
    activation: str | None,
    inner_activation: str | None = None,
    save_t: bool = False,
    tiles: _dispatch.Tiles | None = None,
    masked_ops: bool | None = None,
) -> Float[Array, "M N"] | tuple[Float[Array, "M N"], Float[Array, "M r"]]:
    """act(σ(x @ a) @ b + bias) in one Pallas kernel; with `save_t` also t = x @ a.

    σ is `inner_activation` (None for none); the saved t is its input.

    All inputs share one dtype (float32 or bfloat16); accumulation is float32.
    `tiles` and `masked_ops` default to the backend's choice (tests override them).
    """
    (m, k), (r, n) = x.shape, b.shape
    tiles = tiles or _dispatch.tiles(m, n, r)
    masked_ops = _dispatch.masked_ops() if masked_ops is None else masked_ops
    bm, bk, bn, r_pad, split = tiles.bm, tiles.bk, tiles.bn, tiles.r_pad, tiles.split
    chunks = pl.cdiv(pl.cdiv(n, bn), split)  # bn-wide tiles per program
    k_pad, n_pad = pl.cdiv(k, bk) * bk, split * chunks * bn
    weights = [_tiling.pad_to(a, (k_pad, r_pad)), _tiling.pad_to(b, (r_pad, n_pad))]
    in_specs = [
        pl.BlockSpec((bm, k_pad), lambda i, j: (i, 0)),
        pl.BlockSpec((k_pad, r_pad), lambda i, j: (0, 0)),
        pl.BlockSpec((r_pad, n_pad), lambda i, j: (0, 0)),
    ]
    if bias is not None:
        weights.append(_tiling.pad_to(bias[None, :], (1, n_pad)))
        in_specs.append(pl.BlockSpec((1, n_pad), lambda i, j: (0, 0)))
    out_shape = [jax.ShapeDtypeStruct((m, n), x.dtype)]
    out_specs = [pl.BlockSpec((bm, chunks * bn), lambda i, j: (i, j))]
    if save_t:
        out_shape.append(jax.ShapeDtypeStruct((m, r), x.dtype))
        out_specs.append(pl.BlockSpec((bm, r_pad), lambda i, j: (i, 0)))
    kernel = functools.partial(
        _forward_kernel,
        m=m,
        k=k,
        n=n,
        r=r,
        tiles=tiles,
        chunks=chunks,
        activation=activation,
        inner_activation=inner_activation,
        has_bias=bias is not None,
        save_t=save_t,
        masked_ops=masked_ops,
    )
    itemsize = x.dtype.itemsize
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(m, bm), split),
        in_specs=in_specs,
        out_specs=out_specs,
        cost_estimate=pl.CostEstimate(
            flops=2 * m * r * (k + n),
            transcendentals=(m * n if activation in ("gelu", "silu") else 0)
            + (m * r if inner_activation in ("gelu", "silu") else 0),
            bytes_accessed=itemsize * (m * k + r * (k + n) + m * n + (m * r if save_t else 0)),
        ),
        name="factored_matmul_fwd",
        **_dispatch.launch_options(tiles),
    )(x, *weights)
    return tuple(outs) if save_t else outs[0]
