"""Evaluation of a traced model on two values per variable, dense and current.

`PairedEvaluation` runs a jaxpr's equations in order on the whole batch, keeping for
every variable the dense model's value and, where it differs, the current model's (the
two share memory until a model array is given a new current value with `set_leaf`).
Calls and scans whose operands include a watched model array are evaluated equation by
equation (scans unrolled, so each iteration sees its own slice); every other run of data
equations is compiled as one segment. A subclass acts on each use of a watched array
(`on_weight_use`): calibration fits or bias-corrects the layer there.
"""

import abc
from collections.abc import Callable, Collection

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import core as jax_core
from jax.extend import core as jex_core

from ._trace import View, sub_jaxpr, view_after, weight_use

# Compiled data segments by program text, shared by every pass (oldest dropped first).
_SEGMENTS: dict[str, Callable] = {}
_MAX_SEGMENTS = 512


class Scope:
    """Variable values of one jaxpr being evaluated: dense, and current where different."""

    def __init__(self, jaxpr, parent: "Scope | None"):
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


def _param_only(scope: Scope, eqn) -> bool:
    """Whether `eqn` is computed from model arrays alone (no data, and not constant)."""
    deps = [scope.depends.get(v) for v in eqn.invars if not isinstance(v, jex_core.Literal)]
    return bool(deps) and all(d is not None for d in deps)


def _free(scope: Scope, eqns: list, last: dict) -> None:
    """Drop the values that no equation after `eqns` reads (and those nothing reads)."""
    for eqn in eqns:
        for v in eqn.invars:
            if not isinstance(v, jex_core.Literal) and last.get(v) is eqn:
                scope.dense.pop(v, None)
                scope.current.pop(v, None)
        for v in eqn.outvars:
            if v not in last:
                scope.dense.pop(v, None)
                scope.current.pop(v, None)


def _last_uses(eqns: list, outvars: list) -> dict:
    """{var: the last of `eqns` that reads it (None: an output in `outvars`)}."""
    last = {v: None for v in outvars if not isinstance(v, jex_core.Literal)}
    for eqn in reversed(eqns):
        for v in eqn.invars:
            if not isinstance(v, jex_core.Literal) and v not in last:
                last[v] = eqn
    return last


def _last_read_of(jaxpr, inputs: Collection[int]) -> int:
    """Index of the last equation of `jaxpr` that reads one of its `inputs` (positions in
    `jaxpr.invars`) or a layout-only view of one (-1 if none does)."""
    viewed = {jaxpr.invars[k] for k in inputs}
    found = -1
    for i, eqn in enumerate(jaxpr.eqns):
        reads = [not isinstance(v, jex_core.Literal) and v in viewed for v in eqn.invars]
        if any(reads):
            found = i
            marks = [View(0, None) if r else None for r in reads]
            if len(eqn.outvars) == 1 and view_after(eqn, marks) is not None:
                viewed.add(eqn.outvars[0])
    return found


def _compiled(ins: list, outs: list, eqns: list) -> Callable:
    """The jitted function of the equations `eqns` from `ins` to `outs`."""
    names = tuple(f"in{i}" for i in range(len(ins)))
    info = jex_core.DebugInfo(
        "lowrank segment", None, names, tuple(f"out{i}" for i in range(len(outs)))
    )
    effects = jax_core.join_effects(*(eqn.effects for eqn in eqns))
    jaxpr = jax_core.Jaxpr((), ins, outs, eqns, effects, debug_info=info)
    closed = jax_core.ClosedJaxpr(jaxpr, ())
    key = str(closed)  # variables are renamed canonically: equal text, equal program
    if key not in _SEGMENTS:
        if len(_SEGMENTS) >= _MAX_SEGMENTS:
            del _SEGMENTS[next(iter(_SEGMENTS))]
        _SEGMENTS[key] = jax.jit(jax_core.jaxpr_as_fun(closed))
    return _SEGMENTS[key]


def bind(eqn, values):
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*values, **params)
    return out if eqn.primitive.multiple_results else [out]


class PairedEvaluation(abc.ABC):
    """A pass over a model's jaxpr with dense and current values (see the module)."""

    def __init__(self, watched: Collection[int], leaves, *, until_last_read: bool = False):
        self.watched = watched  # leaf indices whose uses `on_weight_use` acts on
        self.leaves = list(leaves)  # current value of each model array
        self.scopes: list[Scope] = []
        # End the pass at the last top-level equation that reads a watched array: nothing
        # after it is computed, nor any value kept for it (`run` then returns no outputs).
        self.until_last_read = until_last_read

    @abc.abstractmethod
    def on_weight_use(self, scope: Scope, eqn, view: View, use) -> None:
        """Act on equation `eqn`, a matmul or convolution that uses watched array `view`."""

    def run(self, jaxpr, consts, args, arg_views=None, arg_current=None, leaf_vars=None):
        """Evaluate `jaxpr`; returns (dense outputs, current outputs)."""
        scope = Scope(jaxpr, self.scopes[-1] if self.scopes else None)
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
                    if k in self.watched:
                        scope.views[v] = View(k, tuple(range(np.ndim(a))))
                if arg_current is not None and arg_current[k] is not None:
                    scope.current[v] = arg_current[k]
                if arg_views is not None and arg_views[k] is not None:
                    scope.views[v] = arg_views[k]
            for v, lv in (leaf_vars or {}).items():
                scope.leaf_vars[v] = lv
                scope.depends[v] = frozenset([lv[0]])
            if top and self.until_last_read:
                end = _last_read_of(jaxpr, self.watched)  # leaves come first
                self._run_eqns(scope, jaxpr.eqns[: end + 1], [])
                return [], []
            self._run_eqns(scope, jaxpr.eqns, jaxpr.outvars)
            outs = jaxpr.outvars
            return [scope.read(v, "dense") for v in outs], [
                scope.read(v, "current") if scope.differs(v) else None for v in outs
            ]
        finally:
            self.scopes.pop()

    def _run_eqns(self, scope: Scope, eqns: list, outvars: list) -> None:
        """Evaluate `eqns` in order, keeping what they or `outvars` still need. Runs of
        data equations that involve no watched weight are compiled and run as one
        segment (cached by structure, so the identical blocks of a deep model share one
        compilation); the equations that act on the model arrays alone are evaluated as
        they come, since no data equation feeds them."""
        last = _last_uses(eqns, outvars)
        segment, evaluated = [], []
        for eqn in eqns:
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

    def _in_segment(self, scope: Scope, eqn) -> bool:
        """Whether a data equation (not computed from the model arrays alone) is one the
        pass need not look into: no watched weight among its operands, no effects."""
        if eqn.effects:
            return False
        return not any(not isinstance(v, jex_core.Literal) and v in scope.views for v in eqn.invars)

    def _segment(self, scope: Scope, eqns: list, last: dict) -> None:
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

    def _eqn(self, scope: Scope, eqn) -> None:
        views = [
            None if isinstance(v, jex_core.Literal) else scope.views.get(v) for v in eqn.invars
        ]
        use = weight_use(eqn, views)
        if use is not None and views[use.weight].leaf in self.watched:
            self.on_weight_use(scope, eqn, views[use.weight], use)
        body = sub_jaxpr(eqn)
        watched = any(vw is not None for vw in views)
        if body is not None and watched:
            self._call(scope, eqn, body, views)
            return
        if eqn.primitive.name == "scan" and watched:
            self._scan(scope, eqn, views)
            return
        dense_in = [scope.read(v, "dense") for v in eqn.invars]
        outs = bind(eqn, dense_in)
        for v, o in zip(eqn.outvars, outs):
            scope.dense[v] = o
        if any(scope.differs(v) for v in eqn.invars):
            cur = bind(eqn, [scope.read(v, "current") for v in eqn.invars])
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

    def _call(self, scope: Scope, eqn, body, views) -> None:
        jaxpr, consts = body
        dense_in = [scope.read(v, "dense") for v in eqn.invars]
        cur_in = [scope.read(v, "current") if scope.differs(v) else None for v in eqn.invars]
        leaf_vars = {
            inner: scope.leaf_vars[v]
            for inner, v in zip(jaxpr.invars, eqn.invars)
            if not isinstance(v, jex_core.Literal) and v in scope.leaf_vars
        }
        dense_out, cur_out = self.run(jaxpr, consts, dense_in, views, cur_in, leaf_vars)
        self.write(scope, eqn.outvars, dense_out, cur_out)

    def write(self, scope: Scope, outvars, dense_out, cur_out) -> None:
        for v, d, c in zip(outvars, dense_out, cur_out):
            scope.dense[v] = d
            if c is not None:
                scope.current[v] = c

    def _scan(self, scope: Scope, eqn, views) -> None:
        """Unroll a scan whose operands include a watched weight, one iteration at a time."""
        p = eqn.params
        body = p["jaxpr"]
        n_consts, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
        ins = list(eqn.invars)
        consts, carry = ins[:n_consts], ins[n_consts : n_consts + n_carry]
        xs = ins[n_consts + n_carry :]
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
            filled = [ys_d[i][k] if c is None else c for i, c in enumerate(col)]
            stacked_c.append(None if all(c is None for c in col) else jnp.stack(filled))
        self.write(scope, eqn.outvars, carry_d + stacked_d, carry_c + stacked_c)

    def set_leaf(self, leaf: int, key: int | None, value) -> None:
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
                    outs = bind(eqn, [scope.read(v, "current") for v in eqn.invars])
                    for v, o in zip(eqn.outvars, outs):
                        scope.current[v] = o
