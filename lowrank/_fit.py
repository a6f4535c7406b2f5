"""Fitting layers: build each layer's `LayerProblem`, call the initializer, check and
time what it returns, and measure the plan entry's errors."""

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ._initializers import Factors, Initializer, LayerProblem
from ._plan import LayerPlan
from ._select import slice_path, stack_shape, weight_matrix


class LayerFitter:
    """Fits the planned layers one slice at a time, keeping every problem and its factors.

    Called as `fitter(path, index, inputs, dense_inputs)` by the calibration pass (or by
    `fit_all` without calibration); a tqdm bar counts the fitted slices.
    """

    def __init__(
        self,
        layers: Mapping,
        todo: Mapping[str, LayerPlan],
        initializer: Initializer,
        init_name: str,
        activations: Mapping,
        key: jax.Array,
    ):
        self.layers, self.todo = layers, todo
        self.initializer, self.init_name = initializer, init_name
        self.activations, self.key = activations, key
        self.index_of = {path: i for i, path in enumerate(todo)}
        self.solved: dict[str, dict[tuple, tuple[LayerProblem, Factors]]] = {p: {} for p in todo}
        self.seconds = dict.fromkeys(todo, 0.0)
        self.converted: list[tuple] = []  # (host rows, device array) of the last layer
        slices = sum(math.prod(stack_shape(layers[p])) for p in todo)
        self.progress = tqdm(
            total=slices, desc="factorize", unit="layer", disable=None, leave=False
        )

    def __call__(self, path, index=None, inputs=None, dense_inputs=None) -> Factors:
        """Factors for layer `path` (its slice `index` if stacked) from `inputs`."""
        layer = self.layers[path]
        lead = stack_shape(layer)
        at = () if index is None else (index,) if isinstance(index, int) else tuple(index)
        weight = weight_matrix(layer)
        bias = None if layer.bias is None else np.asarray(layer.bias)
        layer_key = jax.random.fold_in(self.key, self.index_of[path])
        if at:
            weight = jnp.asarray(np.asarray(weight)[at])
            bias = None if bias is None else bias[at]
            layer_key = jax.random.fold_in(layer_key, int(np.ravel_multi_index(at, lead)))
        problem = LayerProblem(
            path=slice_path(path, at) if at else path,
            weight=weight,
            bias=None if bias is None else jnp.asarray(bias.reshape(-1)),
            rank=self.todo[path].rank,
            activation=self.activations.get(path),
            inputs=self._device(inputs),
            dense_inputs=self._device(dense_inputs),
        )
        start = time.perf_counter()
        factors = self.initializer(problem, key=layer_key)
        check_factors(factors, problem, self.init_name)
        self.seconds[path] += time.perf_counter() - start
        # Kept for the plan's errors, without the rows: memory must not grow with layers.
        kept = dataclasses.replace(problem, inputs=None, dense_inputs=None)
        self.solved[path][at] = (kept, factors)
        self.progress.set_postfix_str(problem.path, refresh=False)
        self.progress.update()
        return factors

    def _device(self, rows):
        """`rows` as a jax array (device arrays as they are; host rows converted once, the
        same array for the same rows as the previous layer's, for layers that read one
        input), so that the initializer can share its statistics."""
        if rows is None or isinstance(rows, jax.Array):
            return rows
        for host, device in self.converted:
            if host is rows:
                return device
        self.converted = [*self.converted[-1:], (rows, jnp.asarray(rows))]
        return self.converted[-1][1]

    def fit_all(self) -> None:
        """Fit every slice of every planned layer without calibration inputs."""
        for path in self.todo:
            lead = stack_shape(self.layers[path])
            for at in np.ndindex(lead) if lead else [None]:
                self(path, at)

    def results(self) -> dict[str, tuple[LayerPlan, list[Factors]]]:
        """{path: (measured plan entry with its fit time, factors of each slice in order)}."""
        self.progress.close()
        out = {}
        for path, parts in self.solved.items():
            problems, factors = zip(*(parts[at] for at in sorted(parts)))
            entry = measured(self.todo[path], problems, factors)
            out[path] = (
                dataclasses.replace(entry, fit_seconds=round(self.seconds[path], 4)),
                factors,
            )
        return out


def check_factors(factors: Factors, problem: LayerProblem, name: str) -> None:
    """Raise naming the layer unless the factors have the planned shapes and are finite."""
    m, n = problem.weight.shape
    r = problem.rank
    if factors.u.shape != (m, r) or factors.v.shape != (r, n):
        raise ValueError(
            f"init {name!r} returned u {factors.u.shape}, v {factors.v.shape} for "
            f"{problem.path}; expected ({m}, {r}) and ({r}, {n})"
        )
    arrays = [factors.u, factors.v] + ([] if factors.bias is None else [factors.bias])
    if not all(np.isfinite(np.asarray(a)).all() for a in arrays):
        for array, what in (
            (problem.weight, "non-finite weights"),
            (problem.bias, "a non-finite bias"),
        ):
            if array is not None and not np.isfinite(np.asarray(array)).all():
                raise ValueError(
                    f"layer {problem.path} has {what} (NaN/inf); fix or re-initialize the "
                    "dense model before factorizing"
                )
        fixes = ["check the calibration data for NaN/inf"] if problem.inputs is not None else []
        fixes += ["try init='spectral'"] if name != "spectral" else []
        raise ValueError(
            f"init {name!r} produced non-finite factors for {problem.path} from finite "
            f"weights and bias; {' or '.join(fixes) or 'please report it'}"
        )


def measured(
    lp: LayerPlan, problems: Sequence[LayerProblem], factors: Sequence[Factors]
) -> LayerPlan:
    """The plan entry with its errors: the relative weight error over all the layer's
    slices (one unless stacked), and the slices' mean function error."""
    sq_err = sq_norm = 0.0
    for problem, f in zip(problems, factors):
        w = np.asarray(problem.weight, np.float64)
        approx = np.asarray(f.u, np.float64) @ np.asarray(f.v, np.float64)
        sq_err += float(np.sum((w - approx) ** 2))
        sq_norm += float(np.sum(w**2))
    err = np.sqrt(sq_err) / max(np.sqrt(sq_norm), 1e-30)
    f_errs = [float(f.function_error) for f in factors if f.function_error is not None]
    f_err = float(np.mean(f_errs)) if f_errs else None
    assumes = next((f.assumes for f in factors if f.assumes), None) if f_err is not None else None
    return dataclasses.replace(lp, weight_error=float(err), function_error=f_err, assumes=assumes)
