"""Rank planning: decide a rank per selected layer, as inspectable, editable data.

A `Plan` lists every selected layer with its rank (or why it stays dense) and the
parameter and FLOP counts before and after. It prints as a table, round-trips
through JSON, and `factorize(model, plan=plan)` applies it (edited or not).
"""

import dataclasses
import heapq
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._initializers import singular_values
from ._layers import LowRankConv
from ._select import (
    LOWRANK_TYPES,
    UNSUPPORTED_MODULES,
    check_keys,
    matches_key,
    select,
    skip_reason,
    stack_shape,
    weight_matrix,
)

PLAN_FORMAT = 1
BUDGET_SPECTRA = ("auto", "data", "weights", "uniform")


@dataclass(frozen=True)
class Budget:
    """A global budget: keep `params` (or `flops`) as this fraction of the selected layers'.

    Ranks are allocated across layers from their spectra, maximizing the product of
    the fractions of squared singular values the layers retain (see `_allocate_budget`).
    `by` says which spectra: "weights" (of the weight matrices), "data" (of W·S, S the
    square root of the layer's input second moment on the calibration data: in that
    basis dropping a component costs its squared singular value of output error; needs
    `calibration=`), "auto" (data when calibration is given, else weights), or
    "uniform" (no allocation: every layer keeps the same fraction, as SVD-LLM does).
    """

    params: float | None = None
    flops: float | None = None
    by: str = "auto"

    def __post_init__(self):
        if self.by not in BUDGET_SPECTRA:
            raise ValueError(f"Budget(by={self.by!r}): choose one of {BUDGET_SPECTRA}")
        for kind in ("params", "flops"):
            object.__setattr__(self, kind, python_number(getattr(self, kind)))
        given = [(k, v) for k, v in (("params", self.params), ("flops", self.flops)) if v is not None]
        if len(given) != 1:
            raise ValueError("Budget takes exactly one of params= or flops=, e.g. Budget(params=0.3)")
        kind, value = given[0]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(
                f"Budget({kind}={value!r}): the fraction must be a number in (0, 1], e.g. 0.3"
            )

    @property
    def kind(self) -> str:
        return "params" if self.params is not None else "flops"

    @property
    def fraction(self) -> float:
        return float(self.params if self.params is not None else self.flops)


@dataclass
class LayerPlan:
    """One selected layer: its rank (None = stays dense), costs, and why it was skipped.

    A stacked layer (scan over layers: weights (L, out, in), `stack_dims` leading stack
    axes in `shape`) has one rank for all its slices; its params and FLOPs count the
    whole stack, and `positions` counts the output vectors of one slice.
    """

    path: str
    kind: str
    shape: tuple[int, ...]
    rank: int | None
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    init: str
    skipped: str | None = None
    positions: int | None = None
    weight_error: float | None = None
    function_error: float | None = None
    factorizable: bool = True
    stack_dims: int = 0
    assumes: str | None = None  # what function_error assumes when not measured on data
    fit_seconds: float | None = None  # time the initializer took on this layer

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """One slice's weight as a matrix: (out, in * prod(kernel))."""
        k = self.stack_dims
        return self.shape[k], math.prod(self.shape[k + 1 :])

    @property
    def slices(self) -> int:
        """How many layers this entry stands for: the stack size, 1 if not stacked."""
        return math.prod(self.shape[: self.stack_dims])


def layer_costs(
    shape: tuple[int, ...],
    rank: int | None,
    *,
    bias: bool,
    positions: int | None,
    stack_dims: int = 0,
) -> tuple[int, int, int, int]:
    """(params before, params after, FLOPs before, FLOPs after) for rank (None = dense).

    FLOPs count multiply and add (2 per MAC) for one example: per output vector times
    `positions`, the output vectors per example (conv output positions, tokens of a
    vmapped Linear), taken as 1 when unknown. A stacked layer (`stack_dims` leading
    axes of `shape`) counts every slice, each at `positions`.
    """
    if not shape:  # a tied weight (eqx.nn.Shared): counted where it lives
        return 0, 0, 0, 0
    slices = math.prod(shape[:stack_dims])
    m, n = shape[stack_dims], math.prod(shape[stack_dims + 1 :])
    b = m if bias else 0
    dense = m * n
    low = dense if rank is None else rank * (m + n)
    per = positions or 1
    costs = dense + b, low + b, 2 * dense * per + b * per, 2 * low * per + b * per
    return tuple(slices * c for c in costs)


@dataclass
class Plan:
    """The per-layer decisions of one factorization, printable and JSON-serialisable."""

    layers: list[LayerPlan]
    rule: str
    budget: dict | None = None
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, path: str) -> LayerPlan:
        for layer in self.layers:
            if layer.path == path:
                return layer
        raise KeyError(f"no layer {path!r} in this plan; layers: {[l.path for l in self.layers]}")

    @property
    def factorized(self) -> list[LayerPlan]:
        return [l for l in self.layers if l.rank is not None]

    def totals(self) -> dict[str, int]:
        keys = ("params_before", "params_after", "flops_before", "flops_after")
        return {k: sum(getattr(l, k) for l in self.layers) for k in keys}

    def with_rank(self, path: str, rank: int | None) -> "Plan":
        """A copy with one layer's rank changed (None keeps it dense); costs recomputed.

        Refuses ranks the planner would refuse: on skipped layers (depthwise, tied...),
        above full rank, or past break-even.
        """
        old = self[path]
        rank = python_number(rank)
        if rank is not None and not old.factorizable:
            raise ValueError(f"layer {path} cannot be factorized: {old.skipped}")
        if not old.factorizable:
            return dataclasses.replace(self, layers=list(self.layers))  # stays as it is
        if rank is not None:
            _check_rank_value(path, old.matrix_shape, rank)
        m, n = old.matrix_shape
        has_bias = old.params_before > old.slices * m * n
        costs = layer_costs(
            old.shape, rank, bias=has_bias, positions=old.positions, stack_dims=old.stack_dims
        )
        new = dataclasses.replace(
            old,
            rank=rank,
            params_before=costs[0],
            params_after=costs[1],
            flops_before=costs[2],
            flops_after=costs[3],
            skipped=None if rank is not None else "kept dense by edit",
            weight_error=None,
            function_error=None,
            assumes=None,
        )
        layers = [new if l.path == path else l for l in self.layers]
        return dataclasses.replace(self, layers=layers, budget=None)

    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT, **dataclasses.asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """The plan `to_json` wrote; raises a ValueError saying what is wrong with `text`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a lowrank plan: invalid JSON ({e})") from None
        return plan_from_data(data)

    def __str__(self) -> str:
        header = ["path", "type", "shape", "rank", "params", "FLOPs", "init", "w-err", "f-err", "note"]
        rows = [header]
        for l in self.layers:
            rows.append(
                [
                    l.path,
                    l.kind,
                    shape_str(l.shape, l.stack_dims),
                    _rank_cell(l),
                    f"{_human(l.params_before)}->{_human(l.params_after)}",
                    f"{_human(l.flops_before)}->{_human(l.flops_after)}",
                    l.init if l.rank is not None else "-",
                    _fmt_err(l.weight_error),
                    _fmt_err(l.function_error) + ("*" if l.assumes else ""),
                    l.skipped or "",
                ]
            )
        t = self.totals()
        rows.append(
            [
                "TOTAL",
                "",
                "",
                f"{len(self.factorized)}/{len(self.layers)}",
                f"{_human(t['params_before'])}->{_human(t['params_after'])}",
                f"{_human(t['flops_before'])}->{_human(t['flops_after'])}",
                "",
                "",
                "",
                f"params x{_ratio(t['params_after'], t['params_before'])}, "
                f"FLOPs x{_ratio(t['flops_after'], t['flops_before'])}",
            ]
        )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
        lines.insert(0, f"lowrank plan: rank={self.rule}")
        if self.budget:
            b = self.budget
            lines.append(f"budget: {b['kind']} asked {b['asked']:.3f}, achieved {b['achieved']:.3f}")
        lines.extend(f"note: {n}" for n in self.notes)
        assumed: dict[str, list[str]] = {}
        for l in self.layers:
            if l.assumes:
                assumed.setdefault(l.assumes, []).append(l.path)
        for text, paths in assumed.items():
            lines.append(f"* f-err assumes {text}, not measured: {_listing(paths)}")
        return "\n".join(lines)


def per_slice_positions(counts: Mapping[str, int], layers: Mapping) -> dict[str, int]:
    """Traced output vectors of every layer (`output_positions`) per slice of a stack:
    a scan over a stacked layer runs each of its L slices once, so the trace counts L
    times what one slice produces."""
    return {p: c // math.prod(stack_shape(layers[p])) for p, c in counts.items()}


def shape_str(shape: tuple[int, ...], stack_dims: int) -> str:
    """`128x32`, or `[4]128x32` for a stack of 4 such layers."""
    stack = "".join(f"[{d}]" for d in shape[:stack_dims])
    return stack + "x".join(map(str, shape[stack_dims:]))


def _rank_cell(l: LayerPlan) -> str:
    if l.rank is not None:
        return str(l.rank)
    return "-" if l.kind in _NOT_DENSE_KINDS else "dense"


_NOT_DENSE_KINDS = {t.__name__ for t in LOWRANK_TYPES + UNSUPPORTED_MODULES}


def _listing(paths: list[str], limit: int = 6) -> str:
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


# ---------------------------------------------------------------- reading plans back

_LAYER_FIELDS = {f.name: f for f in dataclasses.fields(LayerPlan)}
_PLAN_FIELDS = {f.name for f in dataclasses.fields(Plan)}


def _json_types(hint) -> tuple[type, ...]:
    """The JSON value types a LayerPlan field of type `hint` may hold (a float also takes ints)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    allowed = tuple(typing.get_origin(a) or a for a in args)
    return allowed + ((int,) if float in allowed else ())


_FIELD_TYPES = {name: _json_types(hint) for name, hint in typing.get_type_hints(LayerPlan).items()}


def plan_from_data(data) -> Plan:
    """A `Plan` from its JSON data (`Plan.to_json`), every field checked.

    Raises a ValueError naming the first layer and field that is missing, unknown or
    of the wrong type, so that a corrupted or hand-edited plan never half-loads.
    """
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        raise ValueError(f"not a lowrank plan (a JSON object with format {PLAN_FORMAT} expected)")
    data = dict(data)
    del data["format"]
    if set(data) - _PLAN_FIELDS or "layers" not in data or "rule" not in data:
        raise ValueError(
            f"not a lowrank plan: keys {sorted(data)}, expected {sorted(_PLAN_FIELDS)} and format"
        )
    layers = data.pop("layers")
    if not isinstance(layers, list):
        raise ValueError(f"plan 'layers' must be a list, got {type(layers).__name__}")
    notes = data.get("notes", [])
    if not isinstance(data["rule"], str) or not (
        isinstance(notes, list) and all(isinstance(n, str) for n in notes)
    ):
        raise ValueError("plan 'rule' must be a string and 'notes' a list of strings")
    budget = data.get("budget")
    if budget is not None and not (
        isinstance(budget, dict) and set(budget) == {"kind", "asked", "achieved"}
        and budget["kind"] in ("params", "flops")
        and all(isinstance(budget[k], (int, float)) for k in ("asked", "achieved"))
    ):  # fmt: skip
        raise ValueError(
            "plan 'budget' must be null or {'kind': 'params' or 'flops', 'asked': number, "
            f"'achieved': number}}, got {budget!r}"
        )
    return Plan(layers=[_layer_from_data(i, l) for i, l in enumerate(layers)], **data)


def _layer_from_data(index: int, data) -> LayerPlan:
    where = f"plan layer {index}"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    where += f" ({data.get('path')!r})" if "path" in data else ""
    unknown = sorted(set(data) - set(_LAYER_FIELDS))
    missing = sorted(
        name for name, f in _LAYER_FIELDS.items()
        if name not in data and f.default is dataclasses.MISSING
    )  # fmt: skip
    if unknown or missing:
        raise ValueError(f"{where} has unknown fields {unknown} / lacks fields {missing}")
    for name, value in data.items():
        if _FIELD_TYPES[name] == (tuple,):  # a shape
            ok = isinstance(value, list) and all(_is_int(d) and d > 0 for d in value)
            allowed = "a list of positive ints"
        else:
            kinds = _FIELD_TYPES[name]
            ok = isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
            shown = [t for t in kinds if t is not int or float not in kinds]
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in shown)
        if not ok:
            raise ValueError(f"{where} field {name!r} must be {allowed}, got {value!r}")
    return LayerPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def python_number(x):
    """A NumPy/JAX scalar (np.int64(4), np.float32(0.5), jnp.array(4)) as the Python
    int or float it holds; anything else (bools included) passes through unchanged."""
    if isinstance(x, (np.ndarray, np.generic, jax.Array)) and np.ndim(x) == 0:
        value = np.asarray(x)
        if np.issubdtype(value.dtype, np.integer):
            return int(value)
        if np.issubdtype(value.dtype, np.floating):
            return float(value)
    return x


def _check_rank_value(path: str, matrix_shape: tuple[int, int], rank) -> None:
    m, n = matrix_shape
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank for {path} must be a positive int or None, got {rank!r}")
    if rank > min(m, n):
        raise ValueError(f"rank {rank} > min({m}, {n}) for {path}; choose rank <= {min(m, n)}")
    if rank * (m + n) >= m * n:
        raise ValueError(
            f"rank {rank} for {path} is past break-even ({rank * (m + n)} >= {m * n} dense "
            f"params); choose rank < {m * n / (m + n):.1f} or keep the layer dense (None)"
        )


def check_rank_fits(path: str, layer, rank) -> None:
    """Raise unless `layer` can be factorized at `rank` (for plans edited by hand)."""
    reason = skip_reason(layer)
    if reason is not None:
        raise ValueError(f"layer {path} cannot be factorized: {reason}")
    check_weight(path, layer.weight)
    _check_rank_value(path, tuple(weight_matrix(layer).shape[-2:]), rank)


def check_weight(path: str, weight) -> None:
    """Raise unless a layer's weight is finite floating point (what factorizing needs)."""
    if not jnp.issubdtype(weight.dtype, jnp.inexact):
        raise ValueError(
            f"layer {path} has {weight.dtype} weights; low-rank factors need floating-point "
            f"weights: cast the model to float (e.g. float32) or exclude=[{path!r}]"
        )
    if not np.isfinite(np.asarray(weight)).all():
        raise ValueError(
            f"layer {path} has non-finite weights (NaN/inf); fix or re-initialize "
            "the dense model before factorizing"
        )


def _human(x: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return str(x)


def _fmt_err(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.3f}" if b else "-"


# ---------------------------------------------------------------- rank rules


def _python_rule(rank):
    """The rank rule with NumPy/JAX scalars (also dict values) as Python numbers."""
    if isinstance(rank, Mapping):
        return {key: python_number(value) for key, value in rank.items()}
    return python_number(rank)


def _validate_rank_rule(rank, where: str = "rank") -> None:
    if isinstance(rank, bool):
        raise TypeError(f"{where} must be an int, float, 'energy:x', dict or Budget, got {rank!r}")
    if isinstance(rank, int):
        if rank <= 0:
            raise ValueError(f"{where}={rank} must be a positive int (e.g. rank=8)")
    elif isinstance(rank, float):
        if not 0 < rank <= 1:
            raise ValueError(
                f"{where}={rank} is a fraction of full rank and must lie in (0, 1], e.g. 0.25"
            )
    elif isinstance(rank, str):
        _energy_fraction(rank, where)
    elif isinstance(rank, Mapping):
        if not rank and where == "rank":
            raise ValueError(
                "rank={} has no rules: give {pattern: rank} entries, e.g. "
                "rank={'attn': 0.5}, or one rank for every layer, e.g. rank=0.5"
            )
        check_keys(rank, "rank")
        for pattern, value in rank.items():
            if isinstance(value, (Mapping, Budget)):
                raise TypeError(f"{where}[{pattern!r}] must be an int, float or 'energy:x'")
            _validate_rank_rule(value, f"{where}[{pattern!r}]")
    elif not isinstance(rank, Budget):
        raise TypeError(
            f"{where} must be an int, a float in (0, 1], 'energy:x', a dict {{pattern: rank}} "
            f"or lowrank.Budget(...), got {type(rank).__name__}"
        )


def _energy_fraction(rule: str, where: str) -> float:
    prefix = "energy:"
    try:
        if not rule.startswith(prefix):
            raise ValueError
        value = float(rule[len(prefix) :])
    except ValueError:
        raise ValueError(f"{where}={rule!r}: string ranks look like 'energy:0.9'") from None
    if not 0 < value <= 1:
        raise ValueError(f"{where}={rule!r}: the energy fraction must lie in (0, 1]")
    return value


def _rank_from_rule(rule, spectrum: np.ndarray, lp: LayerPlan, explicit: bool) -> int:
    m, n = lp.matrix_shape
    if isinstance(rule, int):
        if rule > min(m, n) and explicit:
            raise ValueError(
                f"rank {rule} > min({m}, {n}) for {lp.path}; choose rank <= {min(m, n)} "
                "or drop the layer from target"
            )
        return rule
    if isinstance(rule, float):
        return max(1, round(rule * min(m, n)))
    energy = np.cumsum(spectrum**2) / max(float(np.sum(spectrum**2)), 1e-30)
    return int(np.searchsorted(energy, _energy_fraction(rule, "rank") - 1e-12) + 1)


def _dict_rule(rank: Mapping, path: str):
    for pattern, value in rank.items():
        if matches_key(pattern, path):
            return value
    return None


def _check_dict_patterns(rank: Mapping, paths: list[str]) -> None:
    for pattern in rank:
        if not any(matches_key(pattern, p) for p in paths):
            raise ValueError(
                f"rank pattern {pattern!r} matches no selected layer; selected layers: "
                f"{paths[:8]}{' ...' if len(paths) > 8 else ''}"
            )


def spectrum(layer) -> np.ndarray:
    """Singular values of the layer's weight matrix, on the host (no per-shape compile).

    A stacked layer gets its slices' combined spectrum: entry i is the root of the sum
    over slices of each slice's i-th squared singular value, so that energy, weight
    error and budget retention at rank r are those of the whole stack, every slice at r.
    """
    w = np.asarray(weight_matrix(layer))
    mats = w.reshape(-1, *w.shape[-2:])
    return np.sqrt(sum(singular_values(m) ** 2 for m in mats))


def _kind(layer) -> str:
    return type(layer).__name__


def _rule_str(rank) -> str:
    if isinstance(rank, Budget):
        by = "" if rank.by == "auto" else f", by={rank.by!r}"
        return f"Budget({rank.kind}={rank.fraction}{by})"
    return repr(rank) if not isinstance(rank, Mapping) else json.dumps(dict(rank))


def make_plan(
    model,
    *,
    rank,
    target=None,
    exclude=None,
    where=None,
    init: str = "spectral",
    positions: Mapping[str, int] | None = None,
    fn_name: str = "plan",
    data_spectra: Callable[[list[str]], dict[str, np.ndarray]] | None = None,
) -> Plan:
    """Select layers and decide their ranks; see `lowrank.plan`. `data_spectra(paths)`,
    given calibration data, returns each layer's spectrum in its input-whitened basis
    for a data-aware Budget."""
    if rank is None:
        raise ValueError(f"lowrank.{fn_name} needs rank= (int, float, 'energy:x', dict or Budget)")
    rank = _python_rule(rank)
    _validate_rank_rule(rank)
    candidates = select(model, target=target, exclude=exclude, where=where, fn_name=fn_name)
    if not candidates:
        raise ValueError(
            "no layer selected: the model has no eqx.nn.Linear/Conv layer passing "
            "target/exclude/where; check the filters with lowrank.summary(model)"
        )
    positions = positions or {}
    if isinstance(rank, Mapping):
        _check_dict_patterns(rank, [c.path for c in candidates])
    if isinstance(rank, Budget) and rank.kind == "flops":
        convs = (eqx.nn.Conv, LowRankConv)
        unknown = [c.path for c in candidates if isinstance(c.layer, convs) and c.path not in positions]
        if unknown:
            raise ValueError(
                f"Budget(flops=...) needs conv output sizes, unknown for {unknown[:3]}; "
                "pass example= (an input array or a callable fn(model)) so they can be traced"
            )
    layers = [_layer_plan(c, init, positions.get(c.path)) for c in candidates]
    spectra = {}
    for c in candidates:
        if c.skipped is None:
            check_weight(c.path, c.layer.weight)
            spectra[c.path] = spectrum(c.layer)
    by_path = {c.path: c for c in candidates}
    notes = []
    if isinstance(rank, Budget) and rank.by == "uniform":
        ranks, budget = _uniform_ranks(rank, layers), {"kind": rank.kind, "asked": rank.fraction}
        notes.append("uniform ranks: every layer keeps the same fraction (Budget(by='uniform'))")
    elif isinstance(rank, Budget):
        from_data = rank.by == "data" or (rank.by == "auto" and data_spectra is not None)
        if from_data and data_spectra is None:
            raise ValueError(
                "Budget(by='data') allocates ranks from calibration data: pass calibration= "
                "to factorize, or use Budget(by='weights')"
            )
        allocation = spectra
        if from_data:
            allocation = data_spectra([lp.path for lp in layers if lp.skipped is None])
            notes.append("ranks allocated from calibration data (spectra of W·S, S whitening the inputs)")
        ranks, budget = _allocate_budget(rank, layers, by_path, allocation)
    else:
        ranks, budget = {}, None
        for lp in layers:
            if lp.skipped is not None:
                continue
            rule = _dict_rule(rank, lp.path) if isinstance(rank, Mapping) else rank
            if rule is None:
                lp.skipped = "no rank rule matched"
                continue
            explicit = target is not None or isinstance(rank, Mapping)
            ranks[lp.path] = _rank_from_rule(rule, spectra[lp.path], lp, explicit)
    for lp in layers:
        r = ranks.get(lp.path)
        if r is not None:
            m, n = lp.matrix_shape
            if r >= min(m, n) and isinstance(rank, Budget):
                lp.skipped = "budget affords the exact dense layer (past break-even)"
                r = None
            elif r >= min(m, n):
                lp.skipped = f"rank {r} >= full rank {min(m, n)}: nothing to save"
                r = None
            elif r * (m + n) >= m * n:
                lp.skipped = f"break-even: rank {r} needs {r * (m + n)} >= {m * n} dense params"
                r = None
        lp.rank = r
        if lp.factorizable:  # the others keep the costs of what they are
            has_bias = by_path[lp.path].layer.bias is not None
            lp.params_before, lp.params_after, lp.flops_before, lp.flops_after = layer_costs(
                lp.shape, r, bias=has_bias, positions=lp.positions, stack_dims=lp.stack_dims
            )
        if r is not None:
            s = spectra[lp.path]
            lp.weight_error = float(np.sqrt(np.sum(s[r:] ** 2) / max(np.sum(s**2), 1e-30)))
    plan = Plan(layers=layers, rule=_rule_str(rank), notes=notes)
    if budget is not None:
        kind = budget["kind"]
        t = plan.totals()
        budget["achieved"] = t[f"{kind}_after"] / t[f"{kind}_before"]
        plan.budget = budget
    if any(lp.positions is None and lp.flops_before for lp in layers):
        plan.notes.append(
            "FLOPs count each layer once (a conv: per output position); pass example= "
            "to count positions and tokens"
        )
    if not plan.factorized:
        plan.notes.append("no layer is factorized: the note column says why for each")
    return plan


def _layer_plan(c, init: str, positions: int | None) -> LayerPlan:
    """A candidate's row, rank None, with the costs of the layer as it is.

    A low-rank layer costs what its factors cost; an unsupported module (GRUCell,
    LSTMCell, Embedding) is listed but not counted: it is no Linear/Conv layer.
    """
    layer = c.layer
    stack_dims = 0
    if isinstance(layer, UNSUPPORTED_MODULES):
        w = layer.weight if isinstance(layer, eqx.nn.Embedding) else layer.weight_ih
        shape, costs = tuple(int(d) for d in w.shape), (0, 0, 0, 0)
    else:
        lowrank = isinstance(layer, LOWRANK_TYPES)
        w = layer.weight
        stack_dims = len(stack_shape(layer))
        if lowrank:
            shape = tuple(layer.stack_shape) + tuple(layer.dense_shape)
        else:
            shape = tuple(int(d) for d in w.shape) if eqx.is_array(w) else ()
        r = layer.rank if lowrank else None
        costs = layer_costs(
            shape, r, bias=layer.bias is not None, positions=positions, stack_dims=stack_dims
        )
        costs = (costs[1], costs[1], costs[3], costs[3]) if lowrank else costs
    return LayerPlan(
        path=c.path, kind=_kind(layer), shape=shape, rank=None,
        params_before=costs[0], params_after=costs[1], flops_before=costs[2],
        flops_after=costs[3], init=init, skipped=c.skipped, positions=positions,
        factorizable=c.skipped is None, stack_dims=stack_dims,
    )  # fmt: skip


def _uniform_ranks(budget: Budget, layers) -> dict[str, int]:
    """Every factorizable layer at the rank that keeps `budget.fraction` of its own
    parameters (and so of its FLOPs): r = floor(fraction · m·n / (m + n)), at least 1."""
    ranks = {}
    for lp in layers:
        if lp.skipped is None:
            m, n = lp.matrix_shape
            ranks[lp.path] = max(1, int(budget.fraction * m * n / (m + n)))
    return ranks


def _allocate_budget(budget: Budget, layers, by_path, spectra):
    """Spend a params/FLOPs budget across layers by their spectra; raise if it cannot be met.

    Maximizes the sum over layers of log(retained fraction of squared singular values),
    i.e. the product of what every layer keeps, which compounds like the errors of
    stacked layers do. The objective is concave in each rank, so greedy is optimal:
    each next direction goes to the layer with the largest log-gain per unit cost.
    Near full retention log-gain equals the relative error removed; near rank 1 it
    grows without bound, so no layer is starved because its spectrum is flat.
    """
    kind = budget.kind
    # A stack pays for every slice: rank r of an (L, m, n) stack costs L * r * (m + n).
    scale = {lp.path: (2 * (lp.positions or 1) if kind == "flops" else 1) * lp.slices for lp in layers}

    def bias_cost(lp):
        has_bias = getattr(by_path[lp.path].layer, "bias", None) is not None
        return (lp.matrix_shape[0] if has_bias else 0) * scale[lp.path] / (2 if kind == "flops" else 1)

    def dense_cost(lp):
        m, n = lp.matrix_shape
        return m * n * scale[lp.path]

    def unit_cost(lp):
        m, n = lp.matrix_shape
        return (m + n) * scale[lp.path]

    def as_is(lp):  # the layer's cost as it is (dense, or already low-rank)
        return lp.params_before if kind == "params" else lp.flops_before

    total_before = sum(as_is(lp) for lp in layers)
    allowed = budget.fraction * total_before
    tiny = [lp for lp in layers if lp.skipped is None and unit_cost(lp) >= dense_cost(lp)]
    active = [lp for lp in layers if lp.skipped is None and lp not in tiny]
    spent = sum(as_is(lp) for lp in layers if lp.skipped or lp in tiny)
    spent += sum(bias_cost(lp) + unit_cost(lp) for lp in active)
    if not active and not tiny:  # nothing can be factorized: the plan says why per layer
        return {}, {"kind": kind, "asked": budget.fraction}
    if spent > allowed:
        floor = spent / total_before
        raise ValueError(
            f"Budget({kind}={budget.fraction}) cannot be met: rank 1 in every selected layer "
            f"already needs {floor:.3f} of the {kind}; raise the budget above {floor:.3f} "
            "or exclude layers that cannot be factorized"
        )
    retained = {}
    for lp in active:
        s2 = spectra[lp.path] ** 2
        retained[lp.path] = np.maximum(np.cumsum(s2) / max(float(s2.sum()), 1e-30), 1e-30)

    def push(heap, lp, r):  # offer direction r+1 of this layer
        keep = retained[lp.path]
        if r < len(keep):
            gain = np.log(keep[r] / keep[r - 1])
            heapq.heappush(heap, (-gain / unit_cost(lp), lp.path))

    ranks = {lp.path: 1 for lp in active} | {lp.path: min(lp.matrix_shape) for lp in tiny}
    lookup = {lp.path: lp for lp in active}
    heap = []
    for lp in active:
        push(heap, lp, 1)
    while heap:
        _, path = heapq.heappop(heap)
        lp, r = lookup[path], ranks[path]
        m, n = lp.matrix_shape
        if (r + 1) * (m + n) >= m * n or r + 1 >= min(m, n):
            # Past break-even the exact dense layer is cheaper than rank r+1.
            extra = dense_cost(lp) - r * unit_cost(lp)
            if spent + extra <= allowed:
                ranks[path] = min(m, n)
                spent += extra
            continue
        if spent + unit_cost(lp) > allowed:
            continue
        ranks[path] = r + 1
        spent += unit_cost(lp)
        push(heap, lp, r + 1)
    return ranks, {"kind": kind, "asked": budget.fraction}
