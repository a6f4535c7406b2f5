"""Planning: decide a rank per indexed layer, from a rank rule or a `Budget`."""

import json
from collections.abc import Callable, Mapping

import equinox as eqx
import numpy as np

from ._budget import Budget, budget_ranks
from ._conv import LowRankConv
from ._cost import fits, layer_costs
from ._index import IndexEntry, ModelIndex
from ._plan import LayerPlan, Plan
from ._rank_rules import (
    check_dict_patterns,
    check_rank_fits,
    check_weight,
    dict_rule,
    python_rule,
    rank_from_rule,
    spectrum,
    validate_rank_rule,
)
from ._select import LOWRANK_TYPES, UNSUPPORTED_MODULES


def make_plan(
    index: ModelIndex,
    *,
    rank,
    explicit: bool = False,
    init: str = "spectral",
    positions: Mapping[str, int] | None = None,
    fn_name: str = "plan",
    data_errors: Callable[[str, list[str]], dict[str, np.ndarray]] | None = None,
) -> Plan:
    """Decide the ranks of the indexed layers; see `lowrank.plan`.

    `explicit`: the user named the layers (target=), so an int rank above a layer's
    full rank raises instead of keeping it dense. `data_errors(by, paths)`, given
    calibration data, returns each layer's error curve from the data for a data-aware
    Budget (`budget_ranks`).
    """
    rank = _checked_rule(rank, fn_name)
    if not index:
        raise ValueError(
            "no layer selected: the model has no eqx.nn.Linear/Conv layer passing "
            "target/exclude/where; check the filters with lowrank.summary(model)"
        )
    positions = positions or {}
    if isinstance(rank, Mapping):
        check_dict_patterns(rank, list(index))
    if isinstance(rank, Budget) and rank.kind == "flops":
        _check_conv_positions(index, positions)
    layers = [_layer_plan(e, init, positions.get(e.path)) for e in index.entries]
    spectra = {}
    for e in index.entries:
        if e.skipped is None:
            check_weight(e.path, e.layer.weight)
            spectra[e.path] = spectrum(e.layer)
    budget, notes = None, []
    if isinstance(rank, Budget):
        ranks, budget, notes = budget_ranks(rank, layers, spectra, data_errors)
    else:
        ranks = _rule_ranks(rank, layers, spectra, explicit or isinstance(rank, Mapping))
    for lp in layers:
        _settle(lp, ranks.get(lp.path), spectra.get(lp.path), isinstance(rank, Budget))
    plan = Plan(layers=layers, rule=_rule_str(rank), notes=notes)
    if budget is not None:
        t = plan.totals()
        plan.budget = budget | {
            "achieved": t[f"{budget['kind']}_after"] / t[f"{budget['kind']}_before"]
        }
    if any(lp.positions is None and lp.flops_before for lp in layers):
        plan.notes.append(
            "FLOPs count each layer once (a conv: per output position); pass example= "
            "to count positions and tokens"
        )
    if not plan.factorized:
        plan.notes.append("no layer is factorized: the note column says why for each")
    return plan


def _checked_rule(rank, fn_name: str):
    if rank is None:
        raise ValueError(f"lowrank.{fn_name} needs rank= (int, float, 'energy:x', dict or Budget)")
    rank = python_rule(rank)
    if not isinstance(rank, Budget):
        validate_rank_rule(rank)
    return rank


def _check_conv_positions(index: ModelIndex, positions: Mapping[str, int]) -> None:
    convs = (eqx.nn.Conv, LowRankConv)
    unknown = [
        e.path for e in index.entries if isinstance(e.layer, convs) and e.path not in positions
    ]
    if unknown:
        raise ValueError(
            f"Budget(flops=...) needs conv output sizes, unknown for {unknown[:3]}; "
            "pass example= (an input array or a callable fn(model)) so they can be traced"
        )


def _rule_ranks(rank, layers: list[LayerPlan], spectra, explicit: bool) -> dict[str, int]:
    """The rank of every factorizable layer under an int/fraction/energy/dict rule; a
    layer no dict key matches is marked skipped."""
    ranks = {}
    for lp in layers:
        if lp.skipped is not None:
            continue
        rule = dict_rule(rank, lp.path) if isinstance(rank, Mapping) else rank
        if rule is None:
            lp.skipped = "no rank rule matched"
            continue
        ranks[lp.path] = rank_from_rule(rule, spectra[lp.path], lp.path, lp.matrix_shape, explicit)
    return ranks


def _settle(lp: LayerPlan, r: int | None, s: np.ndarray | None, by_budget: bool) -> None:
    """Set the layer's final rank (None past full rank or break-even, with the reason),
    its costs and its spectral weight error."""
    if r is not None:
        m, n = lp.matrix_shape
        if r >= min(m, n) and by_budget:
            lp.skipped = "budget affords the exact dense layer (past break-even)"
            r = None
        elif r >= min(m, n):
            lp.skipped = f"rank {r} >= full rank {min(m, n)}: nothing to save"
            r = None
        elif not fits(m, n, r):
            lp.skipped = f"break-even: rank {r} needs {r * (m + n)} >= {m * n} dense params"
            r = None
    lp.rank = r
    if lp.factorizable:  # the others keep the costs of what they are
        lp.params_before, lp.params_after, lp.flops_before, lp.flops_after = layer_costs(
            lp.shape, r, bias=lp.bias, positions=lp.positions, stack_dims=lp.stack_dims
        )
    if r is not None:
        lp.weight_error = float(np.sqrt(np.sum(s[r:] ** 2) / max(np.sum(s**2), 1e-30)))


def _rule_str(rank) -> str:
    if isinstance(rank, Budget):
        return str(rank)
    return repr(rank) if not isinstance(rank, Mapping) else json.dumps(dict(rank))


def _layer_plan(e: IndexEntry, init: str, positions: int | None) -> LayerPlan:
    """An indexed layer's row, rank None, with the costs of the layer as it is.

    A low-rank layer costs what its factors cost; an unsupported module (GRUCell,
    LSTMCell, Embedding) is listed but not counted: it is no Linear/Conv layer.
    """
    if isinstance(e.layer, UNSUPPORTED_MODULES):
        costs = (0, 0, 0, 0)
    else:
        lowrank = isinstance(e.layer, LOWRANK_TYPES)
        r = e.layer.rank if lowrank else None
        costs = layer_costs(e.shape, r, bias=e.bias, positions=positions, stack_dims=e.stack_dims)
        costs = (costs[1], costs[1], costs[3], costs[3]) if lowrank else costs
    return LayerPlan(
        path=e.path,
        kind=e.kind,
        shape=e.shape,
        rank=None,
        params_before=costs[0],
        params_after=costs[1],
        flops_before=costs[2],
        flops_after=costs[3],
        init=init,
        bias=e.bias,
        skipped=e.skipped,
        positions=positions,
        factorizable=e.skipped is None,
        stack_dims=e.stack_dims,
    )


def check_plan_fits(plan: Plan, index: ModelIndex) -> Plan:
    """Raise unless `plan` (given to factorize) fits the indexed model: its layers exist,
    are dense, have the planned shapes and can take the planned ranks."""
    if not isinstance(plan, Plan):
        raise TypeError(
            f"plan must be a lowrank.Plan (see lowrank.plan), got {type(plan).__name__}"
        )
    layers = index.layers
    for lp in plan.layers:
        layer = layers.get(lp.path)
        if layer is None:
            raise ValueError(
                f"plan layer {lp.path} is not in this model; was the plan made for another model?"
            )
        if lp.rank is None:
            continue
        if isinstance(layer, LOWRANK_TYPES):
            raise ValueError(
                f"plan layer {lp.path} is already a {type(layer).__name__}; "
                "lowrank.densify(model) first to re-factorize it"
            )
        if tuple(layer.weight.shape) != tuple(lp.shape):
            raise ValueError(
                f"plan layer {lp.path} has shape {tuple(lp.shape)} but the model's weight is "
                f"{tuple(layer.weight.shape)}; re-plan with lowrank.plan(model, ...)"
            )
        check_rank_fits(lp.path, layer, lp.rank)
    return plan
