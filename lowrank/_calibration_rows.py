"""The rows a layer is fitted on: the inputs its matmul or convolution multiplies with the
weight, as (rows, fan_in) in the order of the weight's `reshape(out, -1)`, for a sample of
the output positions (conv patches are gathered on the host for the sampled ones only)."""

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._trace import View


def sample(n: int, max_rows: int, *, seed: int) -> np.ndarray:
    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))


def row_count(eqn, use) -> int:
    """How many input rows a weight use has: output vectors (matmul), or positions (conv)."""
    out = eqn.outvars[0].aval.shape
    return math.prod(out) // out[use.out_axis]


def layer_rows(eqn, view: View, use, x, pick: np.ndarray) -> Float[Array, "rows fan_in"]:
    """Rows `pick` of the data operand of a weight use, as float32 (rows, fan_in) in the
    order of the weight's `reshape(out, -1)`: input vectors for a matmul, gathered where
    `x` lives (a matmul's inputs stay a device array, which the host reads without a copy
    on CPU), or image patches for a convolution (gathered on the host)."""
    if eqn.primitive.name == "conv_general_dilated":
        return _patches(eqn, np.asarray(x, np.float32), pick)
    if view.perm is None:
        raise ValueError("a layer's weight reaches its matmul through a reshape; unsupported")
    (contract, _) = eqn.params["dimension_numbers"]
    w, d = use.weight, 1 - use.weight
    # Pair the data's contracted axes with the weight axes they multiply, in weight order.
    pairs = sorted(zip((view.perm[a] for a in contract[w]), contract[d]))
    data_axes = [a for _, a in pairs]
    rest = [a for a in range(np.ndim(x)) if a not in data_axes]
    x = jnp.asarray(x, jnp.float32).transpose(rest + data_axes)
    rows = x.reshape(-1, math.prod(x.shape[len(rest) :]))
    return rows if len(pick) == len(rows) else rows[pick]


def _patches(eqn, x: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """The image patches a convolution multiplies at output positions `pick` (in the order
    of its (batch, *spatial) outputs), features in (in, *kernel) order; gathered on the
    host for the picked positions only."""
    p = eqn.params
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        raise ValueError("grouped convolutions are not factorized")
    if any(d != 1 for d in p["lhs_dilation"]):
        raise ValueError("transposed (input-dilated) convolutions are not supported")
    dn = p["dimension_numbers"]
    rhs_shape = eqn.invars[1].aval.shape
    if tuple(dn.rhs_spec) != tuple(range(len(rhs_shape))):
        raise ValueError("convolution weights must be laid out (out, in, *kernel) (OIHW)")
    kernel = rhs_shape[2:]
    out_shape = eqn.outvars[0].aval.shape
    out_spatial = [out_shape[a] for a in dn.out_spec[2:]]
    x = x.transpose(dn.lhs_spec)  # (N, C, *spatial)
    pads = [(0, 0), (0, 0)] + [tuple(max(q, 0) for q in pad) for pad in p["padding"]]
    if any(q < 0 for pad in p["padding"] for q in pad):
        raise ValueError("negative convolution padding is not supported in calibration")
    x = np.pad(x, pads)
    spatial = len(kernel)
    where = np.unravel_index(pick, (x.shape[0], *out_spatial))
    index = [where[0].reshape(-1, *([1] * spatial))]
    for d in range(spatial):
        start = where[1 + d] * p["window_strides"][d]
        taps = np.arange(kernel[d]) * p["rhs_dilation"][d]
        shape = [-1] + [1] * spatial
        shape[1 + d] = kernel[d]
        index.append((start[:, None] + taps[None, :]).reshape([len(pick)] + shape[1:]))
    x = np.moveaxis(x, 1, -1)  # (N, *spatial, C)
    patches = x[tuple(index)]  # (S, *kernel, C)
    return np.moveaxis(patches, -1, 1).reshape(len(pick), -1)
