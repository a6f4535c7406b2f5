"""The multi-run sequential calibration that the one-pass engine replaced, kept as a
reference for tests: each layer group is fitted after a fresh run of the partly
factorized model, its inputs recorded by taps that wrap the layers; then the biases of
unfactorized layers downstream are corrected, one run per corrected layer."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowrank._conv import pad_for_conv
from lowrank._initializers import Factors
from lowrank._select import is_layer, key_path_to_str, replace_layers, walk_layers, weight_matrix

Example = Callable | jax.Array | np.ndarray
Solve = Callable[[str, np.ndarray, np.ndarray | None], Factors]
_PROBE_SIZE = 4096


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
        call = lambda m: jax.vmap(m)(data)  # (a batch of inputs)
    else:
        if isinstance(data, jax.ShapeDtypeStruct):
            data = jnp.zeros(data.shape, data.dtype)
        call = lambda m: m(data)  # (one unbatched input)
    jitted = eqx.filter_jit(call)

    def run(model):
        jax.block_until_ready(jitted(model))
        jax.effects_barrier()

    return run


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


def solve_layers(
    model,
    paths: list[str],
    calibration: Example,
    solve: Solve,
    *,
    sequential: bool,
    max_rows: int,
) -> dict[str, Factors]:
    """{path: factors} from `solve(path, inputs, dense_inputs)` for every layer in `paths`.

    `dense_inputs` is None where the layer's inputs are the dense model's own (always
    when not `sequential`).
    """
    recorder = InputRecorder(paths, calibration, max_rows=max_rows)
    dense = recorder.record(model)  # in the order the model first runs the layers
    if not sequential:
        return {path: solve(path, rows, None) for path, rows in dense.items()}
    layers = dict(walk_layers(model))
    current, factors = model, {}
    for group in _same_input_groups(dense):
        seen = recorder.record(current, group) if factors else dense
        for path in group:
            unchanged = np.array_equal(seen[path], dense[path])
            factors[path] = solve(path, seen[path], None if unchanged else dense[path])
        current = replace_layers(current, {p: merged(layers[p], factors[p]) for p in group})
    return factors


def corrected_biases(
    model, factors: dict[str, Factors], calibration: Example, *, max_rows: int
) -> dict[str, eqx.Module]:
    """Bias correction downstream of the factorized layers: {path: layer} for every
    dense Linear/Conv with a bias that was not factorized but whose inputs the factorized
    layers shifted, its bias moved by W (E[x_dense] - E[x_now]) so that its mean output
    on the calibration data is the dense model's again (Nagel et al. 2019's empirical
    bias correction). Corrected in run order, each on the inputs that the corrections
    before it leave: one run per corrected layer, plus two. The factorized layers' own
    biases are already fitted."""
    layers = dict(walk_layers(model))
    paths = [
        path
        for path, layer in layers.items()
        if path not in factors
        and isinstance(layer, (eqx.nn.Linear, eqx.nn.Conv))
        and layer.bias is not None
    ]
    if not paths:
        return {}
    recorder = InputRecorder(paths, calibration, max_rows=max_rows)
    dense = recorder.record(model, strict=False)  # in run order
    current = replace_layers(model, {p: merged(layers[p], f) for p, f in factors.items()})
    seen = recorder.record(current, strict=False)
    shifted = [path for path in dense if not np.array_equal(dense[path], seen[path])]
    corrected = {}
    for path in shifted:
        if corrected:  # the last correction moved this layer's inputs too
            seen = recorder.record(current, [path])
        layer = layers[path]
        shift = dense[path].astype(np.float64).mean(0) - seen[path].astype(np.float64).mean(0)
        weight = np.asarray(weight_matrix(layer), np.float64)
        bias = np.asarray(layer.bias, np.float64) + (weight @ shift).reshape(layer.bias.shape)
        corrected[path] = eqx.tree_at(lambda l: l.bias, layer, jnp.asarray(bias, layer.bias.dtype))
        current = replace_layers(current, {path: corrected[path]})
    return corrected


def _same_input_groups(dense: dict[str, np.ndarray]) -> list[list[str]]:
    """Layers in run order, those with identical dense inputs (one tensor) in one group."""
    groups: list[list[str]] = []
    by_content: dict[tuple, list[list[str]]] = {}
    for path, rows in dense.items():
        candidates = by_content.setdefault((rows.shape, hash(rows.tobytes())), [])
        group = next((g for g in candidates if np.array_equal(dense[g[0]], rows)), None)
        if group is None:
            group = []
            candidates.append(group)
            groups.append(group)
        group.append(path)
    return groups


def merged(layer: eqx.Module, factors: Factors) -> eqx.Module:
    """The dense `layer` with weight u @ v and the factors' bias: the factorized layer's
    function in the dense layer's structure."""
    weight = np.asarray(factors.u, np.float64) @ np.asarray(factors.v, np.float64)
    weight = jnp.asarray(weight.reshape(layer.weight.shape), layer.weight.dtype)
    layer = eqx.tree_at(lambda l: l.weight, layer, weight)
    if layer.bias is None or factors.bias is None:
        return layer
    bias = jnp.asarray(np.asarray(factors.bias).reshape(layer.bias.shape), layer.bias.dtype)
    return eqx.tree_at(lambda l: l.bias, layer, bias)
