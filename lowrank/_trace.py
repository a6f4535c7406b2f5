"""Watch selected layers while the model runs: their inputs (calibration) or output shapes.

Each watched layer is wrapped in a tap that passes its input through unchanged and
reports it to the host (`jax.debug.callback`, so it works under jit and vmap) or,
for shapes, records the output shape at trace time (`jax.eval_shape`, no compute).
"""

import functools
import math
from collections import defaultdict
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._layers import pad_for_conv
from ._select import is_layer, key_path_to_str

Example = Callable | jax.Array | jax.ShapeDtypeStruct | np.ndarray


class _Tap(eqx.Module):
    layer: eqx.Module
    path: str = eqx.field(static=True)
    sink: Callable = eqx.field(static=True)
    on_output: bool = eqx.field(static=True)

    def __call__(self, x, *args, **kwargs):
        if self.on_output:
            y = self.layer(x, *args, **kwargs)
            self.sink(self.path, y.shape)
            return y
        jax.debug.callback(functools.partial(self.sink, self.path), x)
        return self.layer(x, *args, **kwargs)


def _with_taps(model, paths: set[str], sink: Callable, on_output: bool):
    def wrap(key_path, leaf):
        path = key_path_to_str(key_path)
        return _Tap(leaf, path, sink, on_output) if path in paths else leaf

    return jax.tree_util.tree_map_with_path(wrap, model, is_leaf=is_layer)


def _run(model, example: Example, *, shapes_only: bool):
    if callable(example) and not isinstance(example, (jax.Array, np.ndarray)):
        call = example
    elif shapes_only:
        call = lambda m: m(example)  # noqa: E731  (an unbatched example input)
    else:
        call = lambda m: jax.vmap(m)(example)  # noqa: E731  (a batch of inputs)
    if shapes_only:
        eqx.filter_eval_shape(call, model)
    else:
        jax.block_until_ready(eqx.filter_jit(call)(model))
        jax.effects_barrier()


def output_positions(model, paths: list[str], example: Example) -> dict[str, int]:
    """Number of output positions (product of spatial dims) of each listed layer."""
    shapes: dict[str, tuple[int, ...]] = {}
    tapped = _with_taps(model, set(paths), lambda p, s: shapes.setdefault(p, tuple(s)), True)
    _run(tapped, example, shapes_only=True)
    return {p: math.prod(s[1:]) for p, s in shapes.items()}


def record_inputs(model, paths: list[str], calibration: Example) -> dict[str, np.ndarray]:
    """Inputs each listed layer saw on the calibration data, stacked along axis 0.

    `calibration` is a batch of model inputs (leading batch axis; the model is
    vmapped over it) or a callable `fn(model)` that runs the model on real data.
    """
    store: dict[str, list[np.ndarray]] = defaultdict(list)
    tapped = _with_taps(model, set(paths), lambda p, x: store[p].append(np.asarray(x)), False)
    _run(tapped, calibration, shapes_only=False)
    missing = [p for p in paths if p not in store]
    if missing:
        raise ValueError(
            f"calibration never ran layers {missing[:5]}; make sure calibration "
            "(a batch of inputs, or fn(model)) calls the model through those layers"
        )
    return {p: np.stack(v) for p, v in store.items()}


def inputs_as_rows(layer, inputs: np.ndarray, *, max_rows: int, seed: int = 0) -> np.ndarray:
    """Calibration inputs in the layer's matrix input space: (rows, fan_in).

    Linear: the input vectors. Conv: the image patches the kernel multiplies, in the
    (in, *kernel) order of `weight.reshape(out, -1)`. Subsampled to `max_rows`.
    """
    if isinstance(layer, eqx.nn.Linear):
        rows = inputs.reshape(-1, layer.weight.shape[1])
    else:
        rows = _conv_patches(layer, inputs.reshape(-1, *inputs.shape[-layer.num_spatial_dims - 1 :]))
    if len(rows) > max_rows:
        pick = np.random.default_rng(seed).choice(len(rows), max_rows, replace=False)
        rows = rows[np.sort(pick)]
    return np.asarray(rows, dtype=np.float32)


def _conv_patches(layer: eqx.nn.Conv, images: np.ndarray) -> np.ndarray:
    x, padding = pad_for_conv(layer, jnp.asarray(images))
    patches = lax.conv_general_dilated_patches(
        x,
        filter_shape=layer.kernel_size,
        window_strides=layer.stride,
        padding=padding,
        rhs_dilation=layer.dilation,
    )  # (N, in * prod(kernel), *out_spatial), features ordered (in, *kernel)
    patches = jnp.moveaxis(patches, 1, -1)
    return np.asarray(patches.reshape(-1, patches.shape[-1]))
