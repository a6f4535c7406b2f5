"""Calibrated factorization in one pass over the calibration data.

The model is traced once into a jaxpr (`_trace`) and its equations are evaluated in
order on the whole calibration batch. Two values are kept for every variable: the
dense model's and the current one's, which differs from it only downstream of a layer
already factorized (the two share memory until then). When the evaluation reaches the
matmul or convolution that consumes a selected layer's weight, the layer is fitted on
the inputs that operation receives, against the dense layer's outputs on the dense
model's inputs, and the current model continues with the fitted factors (merged back
into the weight's own shape, so the rest of the jaxpr runs as traced). Errors then do
not compound down the network, as in GPTQ or the deep-network form of NKP. A dense layer
with a bias that is left unfactorized but sees shifted inputs gets its bias corrected at
the same point, so that its mean output is the dense model's again (Nagel et al. 2019).

Scan-over-layers stacks are unrolled while one of their weights is being fitted, so each
slice is fitted on the inputs of its own iteration. A layer called several times is
fitted on its first call's inputs.

With `sequential=False` every layer is fitted on the dense model's inputs (SVD-LLM,
ASVD) and nothing is corrected.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._calibration_rows import layer_rows, row_count, sample
from ._initializers import Factors
from ._paired_eval import PairedEvaluation, Scope, bind
from ._select import attribute_path, stack_shape
from ._trace import View, leaf_paths, trace_for

# fit(path, slice index or None, inputs (N, fan_in), dense inputs or None) -> Factors;
# rows are a device array (a matmul's inputs) or host numpy (conv patches)
Rows = jax.Array | np.ndarray
Fit = Callable[[str, int | None, Rows, Rows | None], Factors]


@dataclass
class Watch:
    """A layer whose weight use the pass acts on: fitted (`fit`) or bias-corrected."""

    path: str
    layer: eqx.Module
    weight: int  # leaf index
    bias: int | None  # leaf index
    fit: bool
    done: set = field(default_factory=set)  # slice indices (None: unstacked) handled

    @property
    def finished(self) -> bool:
        """Every slice (or the layer) handled once."""
        lead = stack_shape(self.layer)
        return self.done >= (set(range(lead[0])) if len(lead) == 1 else {None})


class _Finished(Exception):
    """Raised by the pass once no watched layer is left: what follows (e.g. an LM head's
    logits over the whole vocabulary) need not be computed."""


def calibrate(
    model,
    layers: dict[str, eqx.Module],
    fit: Fit,
    calibration,
    *,
    sequential: bool,
    correct: dict[str, eqx.Module],
    max_rows: int,
    first_calls: bool = False,
) -> dict[str, np.ndarray]:
    """Run the model once on `calibration`, calling `fit` for every layer in `layers` (by
    path; per slice for stacked layers) at its first use, and (if `sequential`) correcting
    the biases of the `correct` layers, which are returned {path: new bias}.

    The pass stops once every watched layer has been handled (sequential, or
    `first_calls`: only each layer's first call counts), so what follows the last one,
    such as an LM head's logits, is never computed, and no value that only the rest
    reads (e.g. every block's output, stacked) is kept. Raises if a layer was never
    reached, naming it.
    """
    (closed, leaves), data = trace_for(model, calibration, batched=True, argument="calibration")
    _check_finite(data)
    data = [_sharded(x) for x in data]
    index = {p: i for i, p in enumerate(leaf_paths(model))}
    watches = {}
    for path, layer in list(layers.items()) + (list(correct.items()) if sequential else []):
        w = index.get(attribute_path(path, "weight"))
        if w is None:
            raise ValueError(f"layer {path}: its weight is not an array of the model")
        b = index.get(attribute_path(path, "bias"))
        watches[w] = Watch(path, layer, w, b, fit=path in layers)
    state = _Pass(watches, fit, sequential, max_rows, leaves, stop_early=sequential or first_calls)
    try:
        state.run(closed.jaxpr, closed.consts, list(leaves) + list(data))
    except _Finished:  # every watched layer handled: the rest of the model is not needed
        pass
    state.fit_pending()
    missing = [w.path for w in watches.values() if w.fit and not w.done]
    if missing:
        raise ValueError(
            f"calibration never ran the matmul of layers {missing[:5]}; make sure calibration "
            "(a batch of inputs, or fn(model)) calls the model through those layers, and that "
            "their weight reaches a matmul/conv directly (not through e.g. weight norm)"
        )
    return state.biases


def _check_finite(data) -> None:
    for x in data:
        if jnp.issubdtype(x.dtype, jnp.inexact) and not bool(jnp.isfinite(x).all()):
            bad = int((~jnp.isfinite(x)).sum())
            raise ValueError(
                f"calibration contains NaN/inf ({bad} of {x.size} values); clean the "
                "calibration data (e.g. jnp.nan_to_num or drop the bad samples)"
            )


def _sharded(batch):
    """The calibration batch split over all local devices along its leading axis (where it
    divides evenly), so that every equation of the pass runs data-parallel."""
    devices = jax.local_devices()
    if len(devices) == 1 or batch.shape[0] % len(devices):
        return batch
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    return jax.device_put(
        batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    )


class _Pass(PairedEvaluation):
    """The calibration pass: fits the watched layers (or corrects their biases) at their
    weights' uses."""

    def __init__(
        self, watches: dict[int, Watch], fit: Fit, sequential, max_rows, leaves, *, stop_early
    ):
        super().__init__(watches, leaves, until_last_read=stop_early)
        self.stop_early = stop_early
        self.watches = watches
        self.fit = fit
        self.sequential = sequential
        self.max_rows = max_rows
        self.biases: dict[str, np.ndarray] = {}
        self.pending: dict[tuple, list[np.ndarray]] = {}
        self.last_rows: list[tuple] = []  # (matmul layout, data, its rows): current and dense

    def on_weight_use(self, scope: Scope, eqn, view: View, use) -> None:
        watch = self.watches[view.leaf]
        key = view.index if view.sliced else None
        if view.sliced and view.index is None:
            raise ValueError(
                f"layer {watch.path}: a stacked weight is used inside a scan that is not "
                "unrolled; calibration cannot tell its slices apart"
            )
        if key in watch.done and (self.stop_early or not watch.fit):
            return  # fitted (or corrected) at its first call
        watch.done.add(key)
        x = 1 - use.weight
        xv = eqn.invars[x]
        changed = scope.differs(xv)
        if watch.fit:
            self._fit(scope, eqn, view, use, watch, key, changed)
        elif changed and watch.bias is not None:
            self._correct_bias(scope, eqn, use, watch, key)
        if self.stop_early and all(w.finished for w in self.watches.values()):
            raise _Finished

    def _fit(self, scope, eqn, view, use, watch, key, changed) -> None:
        x = eqn.invars[1 - use.weight]
        rows = self._rows(eqn, view, use, scope.read(x, "current"))
        if not self.sequential:
            if self.stop_early:  # only the first call counts: fit now, keep nothing
                self.fit(watch.path, key, rows, None)
            else:  # every call's inputs count; fitted after the pass
                self.pending.setdefault((watch.path, key), []).append(rows)
            return
        dense = self._rows(eqn, view, use, scope.read(x, "dense")) if changed else None
        factors = self.fit(watch.path, key, rows, dense)
        weight = self.leaves[watch.weight]
        shape = weight.shape if key is None else weight.shape[1:]
        merged = np.asarray(factors.u, np.float64) @ np.asarray(factors.v, np.float64)
        merged = jnp.asarray(merged.reshape(shape), weight.dtype)
        self.set_leaf(watch.weight, key, merged)
        if watch.bias is not None and factors.bias is not None:
            bias = self.leaves[watch.bias]
            bshape = bias.shape if key is None else bias.shape[1:]
            self.set_leaf(
                watch.bias, key, jnp.asarray(np.asarray(factors.bias).reshape(bshape), bias.dtype)
            )

    def fit_pending(self) -> None:
        """Fit the layers whose inputs were gathered over the whole pass (not sequential)."""
        for (path, key), chunks in self.pending.items():
            rows = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
            if len(rows) > self.max_rows:  # each call's rows are already at most max_rows
                rows = rows[sample(len(rows), self.max_rows, seed=len(chunks))]
            self.fit(path, key, rows, None)
        self.pending = {}

    def _rows(self, eqn, view: View, use, x) -> Rows:
        """The layer's input rows from data `x` (`layer_rows`) at sampled positions. The
        sample depends on the row count only, and the rows of the last matmul input (dense
        and current) are kept, so layers that read the same input (q/k/v, gate/up) get
        one array: their initializer can share its statistics. The rows are computed
        before they are handed on, so that a layer's fit time is its own."""
        pick = sample(row_count(eqn, use), self.max_rows, seed=0)
        if eqn.primitive.name != "dot_general":
            return layer_rows(eqn, view, use, x, pick)
        layout = (view.perm, eqn.params["dimension_numbers"], use.weight, len(pick), id(x))
        for kept_layout, _, rows in self.last_rows:
            if kept_layout == layout:
                return rows
        rows = jax.block_until_ready(layer_rows(eqn, view, use, x, pick))
        self.last_rows = [*self.last_rows[-1:], (layout, x, rows)]  # x kept: its id stays
        return rows

    def _correct_bias(self, scope, eqn, use, watch, key) -> None:
        dense_out = bind(eqn, [scope.read(v, "dense") for v in eqn.invars])[0]
        cur_out = bind(eqn, [scope.read(v, "current") for v in eqn.invars])[0]
        axes = tuple(a for a in range(dense_out.ndim) if a != use.out_axis)
        shift = np.asarray(dense_out, np.float64).mean(axes) - np.asarray(cur_out, np.float64).mean(
            axes
        )
        bias = self.leaves[watch.bias]
        old = bias if key is None else bias[key]
        new = np.asarray(old, np.float64) + shift.reshape(old.shape)
        self.set_leaf(watch.bias, key, jnp.asarray(new, bias.dtype))
        final = self.leaves[watch.bias]
        self.biases[watch.path] = np.asarray(final)
