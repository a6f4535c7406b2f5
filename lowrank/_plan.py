"""The Plan: the per-layer decisions of one factorization, as inspectable, editable data.

A `Plan` lists every selected layer with its rank (or why it stays dense) and the
parameter and FLOP counts before and after. It prints as a table, round-trips
through JSON, and `factorize(model, plan=plan)` applies it (edited or not).
"""

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field

from ._cost import layer_costs
from ._plan_table import plan_table
from ._rank_rules import check_rank_value, python_number

PLAN_FORMAT = 1


@dataclass
class LayerPlan:
    """One selected layer: its rank (None = stays dense), costs, and why it was skipped.

    A stacked layer (scan over layers: weights (L, out, in), `stack_dims` leading stack
    axes in `shape`) has one rank for all its slices; its params and FLOPs count the
    whole stack, and `positions` counts the output vectors of one slice.

    Attributes:
        path, kind, shape: the layer's dotted path, type name and weight shape
            (leading stack axes included).
        rank: the planned rank, or None when the layer stays as it is.
        params_before, params_after, flops_before, flops_after: its costs.
        init: the initializer's name.
        bias: whether the layer has a bias.
        skipped: why it stays as it is, or None.
        positions: output vectors per example of one slice (None: unknown, taken as 1).
        weight_error, function_error: measured (or spectral) relative errors.
        factorizable: False for layers no rank can change (depthwise, tied...).
        stack_dims: how many leading axes of `shape` stack layers.
        assumes: what `function_error` assumes when not measured on data.
        fit_seconds: the initializer's time on this layer.
        epilogue: the activation `factorize` fused into the layer ("relu", "gelu",
            "silu"; `fuse_activations`), or None.
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
    bias: bool  # whether the layer has a bias (counted in params and FLOPs)
    skipped: str | None = None
    positions: int | None = None
    weight_error: float | None = None
    function_error: float | None = None
    factorizable: bool = True
    stack_dims: int = 0
    assumes: str | None = None  # what function_error assumes when not measured on data
    fit_seconds: float | None = None  # time the initializer took on this layer
    epilogue: str | None = None  # the activation fused into the factorized layer

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """One slice's weight as a matrix: (out, in * prod(kernel))."""
        k = self.stack_dims
        return self.shape[k], math.prod(self.shape[k + 1 :])

    @property
    def slices(self) -> int:
        """How many layers this entry stands for: the stack size, 1 if not stacked."""
        return math.prod(self.shape[: self.stack_dims])


@dataclass
class Plan:
    """The per-layer decisions of one factorization, printable and JSON-serialisable.

    Attributes:
        layers: one `LayerPlan` per selected layer, in pytree order.
        rule: the rank rule, as text (`Budget(params=0.3)`, `8`...).
        budget: for a Budget, {"kind", "asked", "achieved"}; else None.
        notes: what the planner wants the reader to know (printed under the table).
    """

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
        """The layers given a rank."""
        return [l for l in self.layers if l.rank is not None]

    def totals(self) -> dict[str, int]:
        """{params_before, params_after, flops_before, flops_after} summed over layers.

        Returns:
            The four sums, by name.
        """
        keys = ("params_before", "params_after", "flops_before", "flops_after")
        return {k: sum(getattr(l, k) for l in self.layers) for k in keys}

    def with_rank(self, path: str, rank: int | None) -> "Plan":
        """A copy with one layer's rank changed (None keeps it dense); costs recomputed.

        Refuses ranks the planner would refuse: on skipped layers (depthwise, tied...),
        above full rank, or past break-even.

        Args:
            path: the layer's path in this plan.
            rank: a positive int, or None to keep the layer dense.

        Returns:
            A new `Plan` (this one is unchanged), its budget record dropped.
        """
        old = self[path]
        rank = python_number(rank)
        if rank is not None and not old.factorizable:
            raise ValueError(f"layer {path} cannot be factorized: {old.skipped}")
        if not old.factorizable:
            return dataclasses.replace(self, layers=list(self.layers))  # stays as it is
        if rank is not None:
            check_rank_value(path, old.matrix_shape, rank)
        costs = layer_costs(
            old.shape, rank, bias=old.bias, positions=old.positions, stack_dims=old.stack_dims
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
        """The plan as JSON text (with a format number), read back by `Plan.from_json`.

        Returns:
            The JSON text.
        """
        return json.dumps({"format": PLAN_FORMAT, **dataclasses.asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """The plan `to_json` wrote; raises a ValueError saying what is wrong with `text`.

        Args:
            text: the JSON text (e.g. an edited plan file).

        Returns:
            The `Plan`.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a lowrank plan: invalid JSON ({e})") from None
        return plan_from_data(data)

    def __str__(self) -> str:
        return plan_table(self)


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
        isinstance(budget, dict)
        and set(budget) == {"kind", "asked", "achieved"}
        and budget["kind"] in ("params", "flops")
        and all(isinstance(budget[k], (int, float)) for k in ("asked", "achieved"))
    ):
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
        name
        for name, f in _LAYER_FIELDS.items()
        if name not in data and f.default is dataclasses.MISSING
    )
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
