"""Tile edges: weights padded with zeros to whole tiles, activations masked.

Weights are small, so they are padded once per call; activations (x, g, outputs) are
large, so their edge tiles are masked instead of copied. On GPU (Triton) and in
interpret mode the mask goes to the memory op itself: lanes outside the array are
neither read nor written. Mosaic TPU has no masked memory ops; there an edge tile is
read whole with its outside lanes zeroed, and the part of a stored block that lies
outside the array is dropped by the block pipeline.
"""

import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu


def pad_to(w, shape):
    """w padded with zeros at the end of each axis up to `shape`."""
    return jnp.pad(w, [(0, s - d) for d, s in zip(w.shape, shape)])


def load(ref, mask, *, masked_ops: bool):
    """ref[...] with zeros where `mask` is False."""
    if masked_ops:
        return plgpu.load(ref, mask=mask, other=0.0)
    return jnp.where(mask, ref[...], 0.0).astype(ref.dtype)


def store(ref, value, mask, *, masked_ops: bool) -> None:
    """ref[...] = value where `mask` is True."""
    if masked_ops:
        plgpu.store(ref, value.astype(ref.dtype), mask=mask)
    else:
        ref[...] = value.astype(ref.dtype)
