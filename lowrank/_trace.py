"""Watch selected layers while the model runs: their inputs (calibration), or how often
they run per example (FLOP counting).

Each watched layer is wrapped in a tap that hands its input to the host through
`jax.pure_callback(..., vmap_method="expand_dims")`: under `vmap` (users batch Equinox
models with it) the host sees the whole batch in one call, not one call per example.
The callback's zero result is added to the input so the tap is never dead code.
"""

import math
from collections import defaultdict
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._layers import LowRankLinear, pad_for_conv
from ._select import is_layer, key_path_to_str, walk_layers

Example = Callable | jax.Array | jax.ShapeDtypeStruct | np.ndarray
_PROBE_SIZE = 4096  # values of each layer's first input kept to compare runs


class _Tap(eqx.Module):
    layer: eqx.Module
    path: str = eqx.field(static=True)
    sink: Callable = eqx.field(static=True)

    def __call__(self, x, *args, **kwargs):
        unbatched = x.ndim
        path, sink = self.path, self.sink

        def receive(value):
            value = np.asarray(value)
            sink(path, value)
            return np.zeros(value.shape[: value.ndim - unbatched], np.float32)

        done = jax.pure_callback(
            receive, jax.ShapeDtypeStruct((), jnp.float32), x, vmap_method="expand_dims"
        )
        return self.layer(x + done.astype(x.dtype), *args, **kwargs)


def _with_taps(model, paths: set[str], sink: Callable):
    def wrap(key_path, leaf):
        path = key_path_to_str(key_path)
        return _Tap(leaf, path, sink) if path in paths else leaf

    return jax.tree_util.tree_map_with_path(wrap, model, is_leaf=is_layer)


def _runner(data: Example, *, batched: bool) -> Callable:
    """A jitted `run(model)` on `data`; reused across calls, it compiles once per structure."""
    if callable(data) and not isinstance(data, (jax.Array, np.ndarray)):
        call = data
    elif batched:
        call = lambda m: jax.vmap(m)(data)  # noqa: E731  (a batch of inputs)
    else:
        if isinstance(data, jax.ShapeDtypeStruct):
            data = jnp.zeros(data.shape, data.dtype)
        call = lambda m: m(data)  # noqa: E731  (one unbatched input)
    jitted = eqx.filter_jit(call)

    def run(model):
        jax.block_until_ready(jitted(model))
        jax.effects_barrier()

    return run


def output_positions(model, paths: list[str], example: Example) -> dict[str, int]:
    """Output vectors each listed layer produces per example: applications (e.g. tokens
    under a vmap) times spatial positions for convs. Runs the model once on `example`."""
    layers = dict(walk_layers(model))
    counts: dict[str, int] = defaultdict(int)

    def sink(path, value):
        layer = layers[path]
        if isinstance(layer, (eqx.nn.Linear, LowRankLinear)):
            calls, per_call = value.shape[:-1], 1
        else:
            spatial = layer.num_spatial_dims
            calls = value.shape[: value.ndim - spatial - 1]
            per_call = math.prod(_out_spatial(layer, value.shape[value.ndim - spatial :]))
        counts[path] += math.prod(calls) * per_call

    _runner(example, batched=False)(_with_taps(model, set(paths), sink))
    return dict(counts)


def _out_spatial(layer, spatial: tuple[int, ...]) -> tuple[int, ...]:
    shape = jax.eval_shape(layer, jax.ShapeDtypeStruct((layer.in_channels, *spatial), jnp.float32))
    return shape.shape[1:]


class InputRecorder:
    """Records, as (rows, fan_in) matrices, the inputs that chosen layers see on the
    calibration data, over as many runs (e.g. of ever more factorized models) as needed.

    `calibration` is a batch of model inputs (leading batch axis; the model is vmapped
    over it) or a callable `fn(model)` that runs the model on real data. Every layer in
    `paths` is tapped on every run, so models of one structure share one compilation;
    only the layers asked for in `record` are kept. Each host call is turned into rows
    (conv: patches) and subsampled at once, so memory stays O(max_rows · fan_in). Each
    layer's subsample is drawn from its own generator seeded alike on every run, so
    runs over the same data keep the same rows in the same order. `probes` keeps, for
    every tapped layer, the leading values of its first input in the last run: a cheap
    way to tell whether two runs fed a layer the same data.
    """

    def __init__(self, paths: list[str], calibration: Example, *, max_rows: int, seed: int = 0):
        self.paths = list(paths)
        self.max_rows = max_rows
        self.seed = seed
        self._run = _runner(calibration, batched=True)
        self._layers: dict = {}
        self._store: dict[str, list[np.ndarray]] = {}
        self._rngs: dict[str, np.random.Generator] = {}
        self.probes: dict[str, np.ndarray] = {}

    def _sink(self, path, value):
        if path not in self.probes:  # only the first call's input: skip the copy after it
            self.probes[path] = np.asarray(value).reshape(-1)[:_PROBE_SIZE].copy()
        if path in self._rngs:  # a layer asked for; the store keeps first-call order
            rows = inputs_as_rows(self._layers[path], value)
            sample = _subsample(rows, self.max_rows, self._rngs[path])
            self._store.setdefault(path, []).append(sample)

    def record(
        self, model, paths: list[str] | None = None, *, strict: bool = True
    ) -> dict[str, np.ndarray]:
        """Run `model` on the calibration data; the inputs of `paths` (default: all),
        keyed in the order the model first ran them. `strict`: a layer the run never
        called is an error (otherwise it is left out)."""
        paths = self.paths if paths is None else paths
        self._layers = dict(walk_layers(model))
        self._store, self.probes = {}, {}
        self._rngs = {p: np.random.default_rng(self.seed) for p in paths}
        self._run(_with_taps(model, set(self.paths), self._sink))
        missing = [p for p in paths if p not in self._store]
        if missing and strict:
            raise ValueError(
                f"calibration never ran layers {missing[:5]}; make sure calibration "
                "(a batch of inputs, or fn(model)) calls the model through those layers"
            )
        return {
            p: _subsample(np.concatenate(v), self.max_rows, self._rngs[p])
            for p, v in self._store.items()
        }


def _subsample(rows: np.ndarray, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    if len(rows) <= max_rows:
        return rows
    return rows[np.sort(rng.choice(len(rows), max_rows, replace=False))]


def inputs_as_rows(layer, inputs: np.ndarray) -> np.ndarray:
    """Layer inputs (any leading batch dims) in the layer's matrix input space: (rows, fan_in).

    Linear: the input vectors. Conv: the image patches the kernel multiplies, in the
    (in, *kernel) order of `weight.reshape(out, -1)`.
    """
    if isinstance(layer, eqx.nn.Linear):
        rows = inputs.reshape(-1, layer.weight.shape[1])
    else:
        images = inputs.reshape(-1, *inputs.shape[inputs.ndim - layer.num_spatial_dims - 1 :])
        rows = _conv_patches(layer, images)
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
