"""A `Plan` as the table `print(plan)` shows: one row per layer, totals, and notes."""

from ._select import LOWRANK_TYPES, UNSUPPORTED_MODULES
from ._table import human, listing, render_table, shape_str


def plan_table(plan) -> str:
    """The table of a `Plan`: every layer's rank, counts and errors, then the totals.

    Args:
        plan: the `Plan`.

    Returns:
        The table's text.
    """
    header = [
        "path",
        "type",
        "shape",
        "rank",
        "params",
        "FLOPs",
        "init",
        "w-err",
        "f-err",
        "note",
    ]
    rows = [_row(l) for l in plan.layers]
    t = plan.totals()
    total = [
        "TOTAL",
        "",
        "",
        f"{len(plan.factorized)}/{len(plan.layers)}",
        f"{human(t['params_before'])}->{human(t['params_after'])}",
        f"{human(t['flops_before'])}->{human(t['flops_after'])}",
        "",
        "",
        "",
        (
            f"params x{_ratio(t['params_after'], t['params_before'])}, "
            f"FLOPs x{_ratio(t['flops_after'], t['flops_before'])}"
        ),
    ]
    lines = [f"lowrank plan: rank={plan.rule}", *render_table(header, rows, [total])]
    if plan.budget:
        b = plan.budget
        lines.append(f"budget: {b['kind']} asked {b['asked']:.3f}, achieved {b['achieved']:.3f}")
    lines.extend(f"note: {n}" for n in plan.notes)
    for text, paths in _paths_by(plan.layers, "assumes").items():
        lines.append(f"* f-err assumes {text}, not measured: {listing(paths)}")
    for name, paths in _paths_by(plan.layers, "epilogue").items():
        lines.append(f"fused epilogue {name} (the layer applies it): {listing(paths)}")
    return "\n".join(lines)


def _paths_by(layers, attribute: str) -> dict[str, list[str]]:
    """{value: paths of the layers with it} for the layers whose `attribute` is set."""
    found: dict[str, list[str]] = {}
    for l in layers:
        if getattr(l, attribute):
            found.setdefault(getattr(l, attribute), []).append(l.path)
    return found


def _row(l) -> list[str]:
    return [
        l.path,
        l.kind,
        shape_str(l.shape, l.stack_dims),
        _rank_cell(l),
        f"{human(l.params_before)}->{human(l.params_after)}",
        f"{human(l.flops_before)}->{human(l.flops_after)}",
        l.init if l.rank is not None else "-",
        _fmt_err(l.weight_error),
        _fmt_err(l.function_error) + ("*" if l.assumes else ""),
        l.skipped or "",
    ]


def _rank_cell(l) -> str:
    if l.rank is not None:
        return str(l.rank)
    return "-" if l.kind in _NOT_DENSE_KINDS else "dense"


_NOT_DENSE_KINDS = {t.__name__ for t in LOWRANK_TYPES + UNSUPPORTED_MODULES}


def _fmt_err(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.3f}" if b else "-"
