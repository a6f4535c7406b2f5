"""Global budgets: `Budget(params=...)` / `Budget(flops=...)`, and the allocator that
spends one across layers: from weight spectra, from calibration data, or uniformly."""

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ._cost import fits
from ._rank_rules import python_number

BUDGET_BY = ("auto", "data", "output", "weights", "uniform")


@dataclass(frozen=True)
class Budget:
    """A global budget: keep `params` (or `flops`) as this fraction of the selected layers'.

    Ranks are allocated across layers to minimize the sum of the layers' errors at
    their ranks (see `allocate_budget`); `by` says which errors.

    Args:
        params: the fraction in (0, 1] of the selected layers' parameters to keep.
        flops: the fraction of their FLOPs to keep instead (give exactly one of the two).
        by: "weights": -log of the fraction of the weight matrix's squared singular
            values kept, i.e. maximize the product of what every layer keeps; "data":
            the same of W·S, S the square root of the layer's input second moment on
            the calibration data (in that basis dropping a component costs its squared
            singular value of the layer's output error); "output": the estimated
            squared change, truncating that layer alone in the W·S basis, of what the
            calibration returns (a Gauss-Newton estimate from random probes of the
            calibration output, one backward pass each; comparable across layers, so
            a layer whose output error the model damps downstream gets fewer ranks);
            "uniform": no allocation, every layer keeps the same fraction, as SVD-LLM
            does; "auto" (the default): "weights". "data" and "output" need
            `calibration=`. On the real models of bench/compress_real.py "weights"
            beat "data" on all four (SmolLM2-135M, MobileNetV2, EfficientNet-Lite0,
            all-MiniLM-L6-v2); "output" was best on MiniLM, "uniform" on SmolLM2
            (see the README).

    Example:
        >>> lowrank.factorize(model, rank=Budget(params=0.6, by="output"),
        ...                   init="whitened", calibration=batch)
    """

    params: float | None = None
    flops: float | None = None
    by: str = "auto"
    DATA_AWARE: ClassVar[tuple[str, ...]] = ("data", "output")  # the `by`s that read data

    def __post_init__(self):
        if self.by not in BUDGET_BY:
            raise ValueError(f"Budget(by={self.by!r}): choose one of {BUDGET_BY}")
        for kind in ("params", "flops"):
            object.__setattr__(self, kind, python_number(getattr(self, kind)))
        given = [
            (k, v) for k, v in (("params", self.params), ("flops", self.flops)) if v is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "Budget takes exactly one of params= or flops=, e.g. Budget(params=0.3)"
            )
        kind, value = given[0]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(
                f"Budget({kind}={value!r}): the fraction must be a number in (0, 1], e.g. 0.3"
            )

    @property
    def kind(self) -> str:
        """ "params" or "flops": what the budget counts."""
        return "params" if self.params is not None else "flops"

    @property
    def fraction(self) -> float:
        """The fraction of `kind` to keep."""
        return float(self.params if self.params is not None else self.flops)

    def __str__(self) -> str:
        by = "" if self.by == "auto" else f", by={self.by!r}"
        return f"Budget({self.kind}={self.fraction}{by})"


def budget_ranks(
    budget: Budget,
    layers: list,
    weight_spectra: dict[str, np.ndarray],
    data_errors: Callable[[str, list[str]], dict[str, np.ndarray]] | None,
) -> tuple[dict[str, int], dict, list[str]]:
    """The ranks a budget gives the factorizable `layers` (LayerPlans), the plan's budget
    record and its notes; chooses the error curves `budget.by` asks for.

    `data_errors(by, paths)`, present when calibration data is, returns each layer's
    error curve (see `allocate_budget`) from the data: by "data", -log of the retained
    fraction of its spectrum in its input-whitened basis; by "output", the estimated
    squared change of the calibration output (`output_error_curves`).
    """
    record = {"kind": budget.kind, "asked": budget.fraction}
    if budget.by == "uniform":
        note = "uniform ranks: every layer keeps the same fraction (Budget(by='uniform'))"
        return uniform_ranks(budget, layers), record, [note]
    by = "weights" if budget.by == "auto" else budget.by
    if by == "weights":
        errors = {path: log_retention_errors(s) for path, s in weight_spectra.items()}
        notes = [] if data_errors is None else [_BY_NOTES["weights"]]
        return allocate_budget(budget, layers, errors), record, notes
    if data_errors is None:
        raise ValueError(
            f"Budget(by={by!r}) allocates ranks from calibration data: pass calibration= "
            "to factorize, or use Budget(by='weights')"
        )
    errors = data_errors(by, [lp.path for lp in layers if lp.skipped is None])
    return allocate_budget(budget, layers, errors), record, [_BY_NOTES[by]]


_BY_NOTES = {
    "weights": (
        "ranks allocated from the weight spectra, not the calibration data "
        "(Budget(by='data') or by='output' allocates from the data)"
    ),
    "data": "ranks allocated from calibration data (spectra of W·S, S whitening the inputs)",
    "output": (
        "ranks allocated from calibration data by each truncation's estimated effect on "
        "the calibration output (Gauss-Newton, random output probes)"
    ),
}


def log_retention_errors(spectrum: np.ndarray) -> np.ndarray:
    """-log of the fraction of squared singular values that rank r = 1, 2, ... keeps:
    the error curve whose sum over layers is minus the log of the product of what every
    layer keeps, which compounds like the errors of stacked layers do."""
    s2 = np.asarray(spectrum, np.float64) ** 2
    kept = np.cumsum(s2) / max(float(s2.sum()), 1e-30)
    return -np.log(np.clip(kept, 1e-30, 1.0))


def uniform_ranks(budget: Budget, layers) -> dict[str, int]:
    """Every factorizable layer at the rank that keeps `budget.fraction` of its own
    parameters (and so of its FLOPs): r = floor(fraction · m·n / (m + n)), at least 1."""
    ranks = {}
    for lp in layers:
        if lp.skipped is None:
            m, n = lp.matrix_shape
            ranks[lp.path] = max(1, int(budget.fraction * m * n / (m + n)))
    return ranks


class _Costs:
    """What one rank direction, the bias and the dense matrix of a layer cost in the
    budget's unit: a stack pays for every slice (rank r of an (L, m, n) stack costs
    L · r · (m + n)), FLOPs for every output position."""

    def __init__(self, kind: str):
        self.kind = kind

    def scale(self, lp) -> int:
        return (2 * (lp.positions or 1) if self.kind == "flops" else 1) * lp.slices

    def bias(self, lp) -> float:
        per = self.scale(lp) / (2 if self.kind == "flops" else 1)
        return (lp.matrix_shape[0] if lp.bias else 0) * per

    def dense(self, lp) -> int:
        m, n = lp.matrix_shape
        return m * n * self.scale(lp)

    def unit(self, lp) -> int:
        m, n = lp.matrix_shape
        return (m + n) * self.scale(lp)

    def as_is(self, lp) -> int:  # the layer's cost as it is (dense, or already low-rank)
        return lp.params_before if self.kind == "params" else lp.flops_before


def allocate_budget(budget: Budget, layers, errors) -> dict[str, int]:
    """Spend a params/FLOPs budget across layers to minimize the sum of their errors;
    raise if it cannot be met.

    `errors[path][r - 1]` is the layer's error at rank r (r = 1 .. min(m, n); the full
    rank, kept as the dense layer, costs no error). Every layer starts at rank 1; the
    rest of the budget goes, step by step, to the layer whose next step on the lower
    convex hull of its (cost, error) curve removes the most error per unit cost, which
    is optimal when the curves are convex (the -log retention of a spectrum is) and
    their convex relaxation's optimum otherwise. Past break-even the dense layer is
    the layer's last point: cheaper than the ranks that no longer fit.
    """
    kind, cost = budget.kind, _Costs(budget.kind)
    total_before = sum(cost.as_is(lp) for lp in layers)
    allowed = budget.fraction * total_before
    tiny = [lp for lp in layers if lp.skipped is None and not fits(*lp.matrix_shape, 1)]
    active = [lp for lp in layers if lp.skipped is None and lp not in tiny]
    spent = sum(cost.as_is(lp) for lp in layers if lp.skipped or lp in tiny)
    spent += sum(cost.bias(lp) + cost.unit(lp) for lp in active)
    if not active and not tiny:  # nothing can be factorized: the plan says why per layer
        return {}
    if spent > allowed:
        floor = spent / total_before
        raise ValueError(
            f"Budget({kind}={budget.fraction}) cannot be met: rank 1 in every selected layer "
            f"already needs {floor:.3f} of the {kind}; raise the budget above {floor:.3f} "
            "or exclude layers that cannot be factorized"
        )
    ranks = {lp.path: min(lp.matrix_shape) for lp in tiny}
    options = {lp.path: _options(lp, errors[lp.path], cost) for lp in active}
    return ranks | _greedy(options, spent, allowed)


def _options(lp, error: np.ndarray, cost: _Costs) -> list[tuple[float, float, int]]:
    """(cost, error, rank) of every rank that fits, then of the dense layer."""
    m, n = lp.matrix_shape
    error = np.asarray(error, np.float64)
    fitting = [r for r in range(1, min(m, n)) if fits(m, n, r)]
    points = [(r * cost.unit(lp), float(error[r - 1]), r) for r in fitting]
    return points + [(cost.dense(lp), 0.0, min(m, n))]


def _hull(points: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """The lower convex hull of points sorted by cost, from the first (rank 1) on."""
    hull = []
    for p in points:
        while len(hull) >= 2 and _gain(hull[-2], p) >= _gain(hull[-2], hull[-1]):
            hull.pop()
        hull.append(p)
    return hull


def _gain(a, b) -> float:
    """Error removed per unit cost from point a to point b."""
    return (a[1] - b[1]) / max(b[0] - a[0], 1e-30)


def _greedy(options: dict, spent: float, allowed: float) -> dict[str, int]:
    """From each layer's first option (`spent` so far), take the next step on the lower
    convex hull of its options with the largest gain while the budget `allowed` affords
    it. When a step is unaffordable, the options past what is left drop out for good
    (what is left only shrinks) and the hull is rebuilt over the rest."""
    hulls = {path: _hull(points) for path, points in options.items()}
    at = dict.fromkeys(hulls, 0)  # each layer's position on its hull
    heap = [(-_gain(h[0], h[1]), path) for path, h in hulls.items() if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        _, path = heapq.heappop(heap)
        hull, here = hulls[path], at[path]
        step = hull[here + 1][0] - hull[here][0]
        if spent + step > allowed:
            now = hull[here]
            rest = [p for p in options[path] if now[0] < p[0] <= now[0] + allowed - spent]
            hull = hulls[path] = _hull([now, *rest])
            at[path] = 0
            if len(hull) > 1:
                heapq.heappush(heap, (-_gain(hull[0], hull[1]), path))
            continue
        spent += step
        at[path] = here + 1
        if here + 2 < len(hull):
            heapq.heappush(heap, (-_gain(hull[here + 1], hull[here + 2]), path))
    return {path: hulls[path][i][2] for path, i in at.items()}
