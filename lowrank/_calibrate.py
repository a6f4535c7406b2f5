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
from jax._src import core as jax_core
from jax.extend import core as jex_core

from ._calibration_rows import layer_rows, row_count, sample
from ._initializers import Factors
from ._select import attribute_path, stack_shape
from ._trace import View, leaf_paths, sub_jaxpr, trace_for, view_after, weight_use

# Compiled data segments by program text, shared by every pass (oldest dropped first).
_SEGMENTS: dict[str, Callable] = {}
_MAX_SEGMENTS = 512

# fit(path, slice index or None, inputs (N, fan_in), dense inputs or None) -> Factors
Fit = Callable[[str, int | None, np.ndarray, np.ndarray | None], Factors]


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
    such as an LM head's logits, is never computed. Raises if a layer was never
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


class _Scope:
    """Variable values of one jaxpr being evaluated: dense, and current where different."""

    def __init__(self, jaxpr, parent: "_Scope | None"):
        self.jaxpr = jaxpr
        self.parent = parent
        self.dense: dict = {}
        self.current: dict = {}
        self.views: dict = {}
        self.leaf_vars: dict = {}  # var -> (leaf, slice index or None): the leaf's value
        self.param_eqns: list = []  # (eqn, leaves it depends on) computed from leaves alone
        self.depends: dict = {}  # var -> leaves it depends on, for data-free vars

    def read(self, v, which: str):
        if isinstance(v, jex_core.Literal):
            return v.val
        if which == "current" and v in self.current:
            return self.current[v]
        return self.dense[v]

    def differs(self, v) -> bool:
        return not isinstance(v, jex_core.Literal) and v in self.current


def _param_only(scope: _Scope, eqn) -> bool:
    """Whether `eqn` is computed from model arrays alone (no data, and not constant)."""
    deps = [scope.depends.get(v) for v in eqn.invars if not isinstance(v, jex_core.Literal)]
    return bool(deps) and all(d is not None for d in deps)


def _free(scope: _Scope, eqns: list, last: dict) -> None:
    """Drop the values that no equation after `eqns` reads."""
    for eqn in eqns:
        for v in eqn.invars:
            if not isinstance(v, jex_core.Literal) and last.get(v) is eqn:
                scope.dense.pop(v, None)
                scope.current.pop(v, None)


def _compiled(ins: list, outs: list, eqns: list) -> Callable:
    """The jitted function of the equations `eqns` from `ins` to `outs`."""
    closed = jax_core.ClosedJaxpr(jax_core.Jaxpr((), ins, outs, eqns), ())
    key = str(closed)  # variables are renamed canonically: equal text, equal program
    if key not in _SEGMENTS:
        if len(_SEGMENTS) >= _MAX_SEGMENTS:
            del _SEGMENTS[next(iter(_SEGMENTS))]
        _SEGMENTS[key] = jax.jit(jax_core.jaxpr_as_fun(closed))
    return _SEGMENTS[key]


def _bind(eqn, values):
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*values, **params)
    return out if eqn.primitive.multiple_results else [out]


class _Pass:
    def __init__(
        self, watches: dict[int, Watch], fit: Fit, sequential, max_rows, leaves, *, stop_early
    ):
        self.stop_early = stop_early
        self.watches = watches
        self.fit = fit
        self.sequential = sequential
        self.max_rows = max_rows
        self.leaves = list(leaves)  # current value of each model array
        self.biases: dict[str, np.ndarray] = {}
        self.scopes: list[_Scope] = []
        self.pending: dict[tuple, list[np.ndarray]] = {}
        self.last_rows: list[tuple] = []  # (matmul layout, data, its rows): current and dense

    # ---------------------------------------------------------------- evaluation

    def run(self, jaxpr, consts, args, arg_views=None, arg_current=None, leaf_vars=None):
        """Evaluate `jaxpr`; returns (dense outputs, current outputs)."""
        scope = _Scope(jaxpr, self.scopes[-1] if self.scopes else None)
        self.scopes.append(scope)
        try:
            for v, c in zip(jaxpr.constvars, consts):
                scope.dense[v] = c
            top = len(self.scopes) == 1
            for k, (v, a) in enumerate(zip(jaxpr.invars, args)):
                scope.dense[v] = a
                if top and k < len(self.leaves):
                    scope.leaf_vars[v] = (k, None)
                    scope.depends[v] = frozenset([k])
                    if k in self.watches:
                        scope.views[v] = View(k, tuple(range(np.ndim(a))))
                if arg_current is not None and arg_current[k] is not None:
                    scope.current[v] = arg_current[k]
                if arg_views is not None and arg_views[k] is not None:
                    scope.views[v] = arg_views[k]
            for v, lv in (leaf_vars or {}).items():
                scope.leaf_vars[v] = lv
                scope.depends[v] = frozenset([lv[0]])
            self._run_eqns(scope, jaxpr)
            outs = jaxpr.outvars
            return [scope.read(v, "dense") for v in outs], [
                scope.read(v, "current") if scope.differs(v) else None for v in outs
            ]
        finally:
            self.scopes.pop()

    def _run_eqns(self, scope: _Scope, jaxpr) -> None:
        """Evaluate the equations in order. Runs of data equations that involve no watched
        weight are compiled and run as one segment (cached by structure, so the identical
        blocks of a deep model share one compilation); the equations that act on the model
        arrays alone are evaluated as they come, since no data equation feeds them."""
        last = jax_core.last_used(jaxpr)
        segment, evaluated = [], []
        for eqn in jaxpr.eqns:
            param_only = _param_only(scope, eqn)
            if not param_only and self._in_segment(scope, eqn):
                segment.append(eqn)
            else:
                if not param_only:  # it reads data: evaluate the segment first
                    self._segment(scope, segment, last)
                    segment = []
                self._eqn(scope, eqn)
            evaluated.append(eqn)
            if not segment:
                _free(scope, evaluated, last)
                evaluated = []
        self._segment(scope, segment, last)
        _free(scope, evaluated, last)

    def _in_segment(self, scope: _Scope, eqn) -> bool:
        """Whether a data equation (not computed from the model arrays alone) is one the
        pass need not look into: no watched weight among its operands, no effects."""
        if eqn.effects:
            return False
        return not any(not isinstance(v, jex_core.Literal) and v in scope.views for v in eqn.invars)

    def _segment(self, scope: _Scope, eqns: list, last: dict) -> None:
        """Evaluate data equations `eqns` as one compiled function, for the dense values
        and (where an input differs) the current ones."""
        if len(eqns) <= 1:
            for eqn in eqns:
                self._eqn(scope, eqn)
            return
        inside = set(map(id, eqns))
        defined = {v for eqn in eqns for v in eqn.outvars}
        ins = list(
            dict.fromkeys(
                v
                for eqn in eqns
                for v in eqn.invars
                if not isinstance(v, jex_core.Literal) and v not in defined
            )
        )
        outs = [v for eqn in eqns for v in eqn.outvars if v in last and id(last[v]) not in inside]
        fn = _compiled(ins, outs, eqns)
        for v, o in zip(outs, fn(*[scope.read(v, "dense") for v in ins])):
            scope.dense[v] = o
        if any(scope.differs(v) for v in ins):
            for v, o in zip(outs, fn(*[scope.read(v, "current") for v in ins])):
                scope.current[v] = o

    def _eqn(self, scope: _Scope, eqn) -> None:
        views = [
            None if isinstance(v, jex_core.Literal) else scope.views.get(v) for v in eqn.invars
        ]
        use = weight_use(eqn, views)
        if use is not None and views[use.weight].leaf in self.watches:
            self._weight_use(scope, eqn, views[use.weight], use)
        body = sub_jaxpr(eqn)
        watched = any(vw is not None for vw in views)
        if body is not None and watched:
            self._call(scope, eqn, body, views)
            return
        if eqn.primitive.name == "scan" and watched:
            self._scan(scope, eqn, views)
            return
        dense_in = [scope.read(v, "dense") for v in eqn.invars]
        outs = _bind(eqn, dense_in)
        for v, o in zip(eqn.outvars, outs):
            scope.dense[v] = o
        if any(scope.differs(v) for v in eqn.invars):
            cur = _bind(eqn, [scope.read(v, "current") for v in eqn.invars])
            for v, o in zip(eqn.outvars, cur):
                scope.current[v] = o
        if _param_only(scope, eqn):  # computed from model arrays alone
            union = frozenset().union(
                *(scope.depends[v] for v in eqn.invars if not isinstance(v, jex_core.Literal))
            )
            scope.param_eqns.append((eqn, union))
            for v in eqn.outvars:
                scope.depends[v] = union
        out_view = view_after(eqn, views) if len(eqn.outvars) == 1 else None
        if out_view is not None:
            scope.views[eqn.outvars[0]] = out_view

    def _call(self, scope: _Scope, eqn, body, views) -> None:
        jaxpr, consts = body
        dense_in = [scope.read(v, "dense") for v in eqn.invars]
        cur_in = [scope.read(v, "current") if scope.differs(v) else None for v in eqn.invars]
        leaf_vars = {
            inner: scope.leaf_vars[v]
            for inner, v in zip(jaxpr.invars, eqn.invars)
            if not isinstance(v, jex_core.Literal) and v in scope.leaf_vars
        }
        dense_out, cur_out = self.run(jaxpr, consts, dense_in, views, cur_in, leaf_vars)
        self._write(scope, eqn.outvars, dense_out, cur_out)

    def _write(self, scope: _Scope, outvars, dense_out, cur_out) -> None:
        for v, d, c in zip(outvars, dense_out, cur_out):
            scope.dense[v] = d
            if c is not None:
                scope.current[v] = c

    def _scan(self, scope: _Scope, eqn, views) -> None:
        """Unroll a scan whose operands include a watched weight, one iteration at a time."""
        p = eqn.params
        body = p["jaxpr"]
        n_consts, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
        ins = list(eqn.invars)
        consts, carry, xs = (
            ins[:n_consts],
            ins[n_consts : n_consts + n_carry],
            ins[n_consts + n_carry :],
        )
        read_d = lambda v: scope.read(v, "dense")
        read_c = lambda v: scope.read(v, "current") if scope.differs(v) else None
        carry_d, carry_c = [read_d(v) for v in carry], [read_c(v) for v in carry]
        ys_d, ys_c = [], []
        order = range(length - 1, -1, -1) if p["reverse"] else range(length)
        for i in order:
            args_d = [read_d(v) for v in consts] + carry_d
            args_c = [read_c(v) for v in consts] + carry_c
            arg_views = list(views[:n_consts]) + [None] * n_carry
            leaf_vars = {}
            for k, v in enumerate(xs):
                # Read xs afresh: fitting slice i-1 may have replaced the stacked weight.
                args_d.append(read_d(v)[i])
                cur = read_c(v)
                args_c.append(None if cur is None else cur[i])
                inner = body.jaxpr.invars[n_consts + n_carry + k]
                if v in scope.leaf_vars and scope.leaf_vars[v][1] is None:
                    leaf_vars[inner] = (scope.leaf_vars[v][0], i)
                view = views[n_consts + n_carry + k]
                sliced = None
                if (
                    view is not None
                    and view.perm is not None
                    and view.perm[0] == 0
                    and not view.sliced
                ):
                    sliced = View(view.leaf, tuple(q - 1 for q in view.perm[1:]), True, i)
                arg_views.append(sliced)
            for k, v in enumerate(consts):
                if not isinstance(v, jex_core.Literal) and v in scope.leaf_vars:
                    leaf_vars[body.jaxpr.invars[k]] = scope.leaf_vars[v]
            out_d, out_c = self.run(body.jaxpr, body.consts, args_d, arg_views, args_c, leaf_vars)
            carry_d, carry_c = out_d[:n_carry], out_c[:n_carry]
            ys_d.append(out_d[n_carry:])
            ys_c.append(out_c[n_carry:])
        if p["reverse"]:
            ys_d, ys_c = ys_d[::-1], ys_c[::-1]
        stacked_d = [jnp.stack(col) for col in zip(*ys_d)] if ys_d and ys_d[0] else []
        stacked_c = []
        for k in range(len(stacked_d)):
            col = [ys_c[i][k] for i in range(length)]
            if all(c is None for c in col):
                stacked_c.append(None)
            else:
                stacked_c.append(
                    jnp.stack([c if c is not None else ys_d[i][k] for i, c in enumerate(col)])
                )
        self._write(scope, eqn.outvars, carry_d + stacked_d, carry_c + stacked_c)

    # ---------------------------------------------------------------- fitting

    def _weight_use(self, scope: _Scope, eqn, view: View, use) -> None:
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
        self._set_leaf(watch.weight, key, merged)
        if watch.bias is not None and factors.bias is not None:
            bias = self.leaves[watch.bias]
            bshape = bias.shape if key is None else bias.shape[1:]
            self._set_leaf(
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

    def _rows(self, eqn, view: View, use, x) -> np.ndarray:
        """The layer's input rows from data `x` (`layer_rows`) at sampled positions. The
        sample depends on the row count only, and the rows of the last matmul input (dense
        and current) are kept, so layers that read the same input (q/k/v, gate/up) get
        one array: their initializer can share its statistics."""
        pick = sample(row_count(eqn, use), self.max_rows, seed=0)
        if eqn.primitive.name != "dot_general":
            return layer_rows(eqn, view, use, x, pick)
        layout = (view.perm, eqn.params["dimension_numbers"], use.weight, len(pick), id(x))
        for kept_layout, _, rows in self.last_rows:
            if kept_layout == layout:
                return rows
        rows = layer_rows(eqn, view, use, x, pick)
        self.last_rows = [*self.last_rows[-1:], (layout, x, rows)]  # x kept: its id stays
        return rows

    def _correct_bias(self, scope, eqn, use, watch, key) -> None:
        dense_out = _bind(eqn, [scope.read(v, "dense") for v in eqn.invars])[0]
        cur_out = _bind(eqn, [scope.read(v, "current") for v in eqn.invars])[0]
        axes = tuple(a for a in range(dense_out.ndim) if a != use.out_axis)
        shift = np.asarray(dense_out, np.float64).mean(axes) - np.asarray(cur_out, np.float64).mean(
            axes
        )
        bias = self.leaves[watch.bias]
        old = bias if key is None else bias[key]
        new = np.asarray(old, np.float64) + shift.reshape(old.shape)
        self._set_leaf(watch.bias, key, jnp.asarray(new, bias.dtype))
        final = self.leaves[watch.bias]
        self.biases[watch.path] = np.asarray(final)

    def _set_leaf(self, leaf: int, key: int | None, value) -> None:
        """Give model array `leaf` (or its slice `key`) a new current value, everywhere it
        is live: the variables holding it and what was computed from it alone."""
        whole = self.leaves[leaf]
        self.leaves[leaf] = value if key is None else whole.at[key].set(value)
        for scope in self.scopes:
            for v, (lf, idx) in scope.leaf_vars.items():
                if lf != leaf or v not in scope.dense:
                    continue
                if idx is None:
                    scope.current[v] = self.leaves[leaf]
                elif idx == key or key is None:
                    scope.current[v] = self.leaves[leaf][idx]
            for eqn, deps in scope.param_eqns:
                if leaf in deps and all(v in scope.dense for v in eqn.outvars):
                    outs = _bind(eqn, [scope.read(v, "current") for v in eqn.invars])
                    for v, o in zip(eqn.outvars, outs):
                        scope.current[v] = o
