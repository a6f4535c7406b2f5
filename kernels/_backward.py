"""The fused epilogue-gradient kernel of the backward pass.

With t = x @ a saved by the forward pass, it recomputes h = σ(t) (the inner
activation, h = t without one) and z = h @ b + bias one tile at a time (cheaper than
storing z: r multiply-adds per element instead of a full M × N write and read), and
emits the two things every other gradient is built from: gz = g * act'(z) (M × N), and
dt = (gz @ bᵀ) * σ'(t) (M × r) reduced over N on chip. Then dx = dt @ aᵀ,
da = xᵀ @ dt, db = hᵀ @ gz and dbias = Σ gz are plain matmuls and a reduction that
XLA already runs at speed.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from . import _activations, _dispatch, _tiling

_CONTRACT_COLS = (((1,), (1,)), ((), ()))  # p @ qᵀ for p (m, n), q (r, n)


def _epilogue_grad_kernel(
    g_ref, t_ref, b_ref, *refs, m, n, r, tiles, activation, inner_activation, has_bias, masked_ops
):
    bias_ref = refs[0] if has_bias else None
    gz_ref, dt_ref = refs[int(has_bias) :]
    bm, bn, r_pad = tiles.bm, tiles.bn, tiles.r_pad
    rows_ok = (pl.program_id(0) * bm + jnp.arange(bm) < m)[:, None]
    rank_ok = rows_ok & (jnp.arange(r_pad) < r)[None, :]
    t = _tiling.load(t_ref, rank_ok, masked_ops=masked_ops)
    inner = inner_activation not in (None, "none")
    h = _activations.apply(inner_activation, t.astype(jnp.float32)).astype(t.dtype) if inner else t

    def n_step(c, dt):
        start = c * bn
        b = b_ref[:, pl.ds(start, bn)]
        z = jnp.dot(h, b, preferred_element_type=jnp.float32)
        if has_bias:
            z = z + bias_ref[:, pl.ds(start, bn)].astype(jnp.float32)
        mask = rows_ok & (start + jnp.arange(bn) < n)[None, :]
        g = _tiling.load(g_ref.at[:, pl.ds(start, bn)], mask, masked_ops=masked_ops)
        gz = (g.astype(jnp.float32) * _activations.derivative(activation, z)).astype(b.dtype)
        _tiling.store(gz_ref.at[:, pl.ds(start, bn)], gz, mask, masked_ops=masked_ops)
        return dt + jax.lax.dot_general(gz, b, _CONTRACT_COLS, preferred_element_type=jnp.float32)

    dt = jax.lax.fori_loop(0, pl.cdiv(n, bn), n_step, jnp.zeros((bm, r_pad), jnp.float32))
    if inner:
        dt = dt * _activations.derivative(inner_activation, t.astype(jnp.float32))
    _tiling.store(dt_ref, dt, rank_ok, masked_ops=masked_ops)


def fused_epilogue_grad(
    g: Float[Array, "M N"],
    t: Float[Array, "M r"],
    b: Float[Array, "r N"],
    bias: Float[Array, " N"] | None,
    *,
    activation: str | None,
    inner_activation: str | None = None,
    tiles: _dispatch.Tiles | None = None,
    masked_ops: bool | None = None,
) -> tuple[Float[Array, "M N"], Float[Array, "M r"]]:
    """(gz, dt) = (g * act'(σ(t) @ b + bias), (gz @ bᵀ) * σ'(t)) in one Pallas kernel.

    σ is `inner_activation` (None for none).

    All inputs share one dtype (float32 or bfloat16); accumulation is float32.
    """
    (m, n), r = g.shape, b.shape[0]
    tiles = tiles or _dispatch.tiles(m, n, r)
    masked_ops = _dispatch.masked_ops() if masked_ops is None else masked_ops
    bm, bn, r_pad = tiles.bm, tiles.bn, tiles.r_pad
    n_pad = pl.cdiv(n, bn) * bn
    weights = [_tiling.pad_to(b, (r_pad, n_pad))]
    in_specs = [
        pl.BlockSpec((bm, n_pad), lambda i: (i, 0)),
        pl.BlockSpec((bm, r_pad), lambda i: (i, 0)),
        pl.BlockSpec((r_pad, n_pad), lambda i: (0, 0)),
    ]
    if bias is not None:
        weights.append(_tiling.pad_to(bias[None, :], (1, n_pad)))
        in_specs.append(pl.BlockSpec((1, n_pad), lambda i: (0, 0)))
    kernel = functools.partial(
        _epilogue_grad_kernel,
        m=m,
        n=n,
        r=r,
        tiles=tiles,
        activation=activation,
        inner_activation=inner_activation,
        has_bias=bias is not None,
        masked_ops=masked_ops,
    )
    gz, dt = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((m, n), g.dtype), jax.ShapeDtypeStruct((m, r), g.dtype)],
        grid=(pl.cdiv(m, bm),),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((bm, n_pad), lambda i: (i, 0)),
            pl.BlockSpec((bm, r_pad), lambda i: (i, 0)),
        ],
        cost_estimate=pl.CostEstimate(
            flops=4 * m * n * r,
            transcendentals=(m * n if activation in ("gelu", "silu") else 0)
            + (m * r if inner_activation in ("gelu", "silu") else 0),
            bytes_accessed=g.dtype.itemsize * (2 * m * n + 2 * m * r + r * n),
        ),
        name="factored_matmul_epilogue_grad",
        **_dispatch.launch_options(tiles),
    )(g, t, *weights)
    return gz, dt
