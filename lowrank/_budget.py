"""Global budgets: `Budget(params=...)` / `Budget(flops=...)`, and the allocator that
spends one across layers, from weight spectra, from calibration data, or uniformly."""

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ._cost import fits
from ._rank_rules import python_number

BUDGET_SPECTRA = ("auto", "data", "weights", "uniform")


@dataclass(frozen=True)
class Budget:
    """A global budget: keep `params` (or `flops`) as this fraction of the selected layers'.

    Ranks are allocated across layers from their spectra, maximizing the product of
    the fractions of squared singular values the layers retain (see `allocate_budget`).

    Args:
        params: the fraction in (0, 1] of the selected layers' parameters to keep.
        flops: the fraction of their FLOPs to keep instead (give exactly one of the two).
        by: which spectra: "weights" (of the weight matrices), "data" (of W·S, S the
            square root of the layer's input second moment on the calibration data: in
            that basis dropping a component costs its squared singular value of output
            error; needs `calibration=`), "auto" (data when calibration is given, else
            weights), or "uniform" (no allocation: every layer keeps the same fraction,
            as SVD-LLM does).
    """

    params: float | None = None
    flops: float | None = None
    by: str = "auto"

    def __post_init__(self):
        if self.by not in BUDGET_SPECTRA:
            raise ValueError(f"Budget(by={self.by!r}): choose one of {BUDGET_SPECTRA}")
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
    data_spectra: Callable[[list[str]], dict[str, np.ndarray]] | None,
) -> tuple[dict[str, int], dict, list[str]]:
    """The ranks a budget gives the factorizable `layers` (LayerPlans), the plan's budget
    record and its notes; chooses the spectra `budget.by` asks for.

    `data_spectra(paths)`, present when calibration data is, returns each layer's
    spectrum in its input-whitened basis.
    """
    record = {"kind": budget.kind, "asked": budget.fraction}
    if budget.by == "uniform":
        note = "uniform ranks: every layer keeps the same fraction (Budget(by='uniform'))"
        return uniform_ranks(budget, layers), record, [note]
    from_data = budget.by == "data" or (budget.by == "auto" and data_spectra is not None)
    if not from_data:
        return allocate_budget(budget, layers, weight_spectra), record, []
    if data_spectra is None:
        raise ValueError(
            "Budget(by='data') allocates ranks from calibration data: pass calibration= "
            "to factorize, or use Budget(by='weights')"
        )
    spectra = data_spectra([lp.path for lp in layers if lp.skipped is None])
    note = "ranks allocated from calibration data (spectra of W·S, S whitening the inputs)"
    return allocate_budget(budget, layers, spectra), record, [note]


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


def allocate_budget(budget: Budget, layers, spectra) -> dict[str, int]:
    """Spend a params/FLOPs budget across layers by their spectra; raise if it cannot be met.

    Maximizes the sum over layers of log(retained fraction of squared singular values),
    i.e. the product of what every layer keeps, which compounds like the errors of
    stacked layers do. The objective is concave in each rank, so greedy is optimal:
    each next direction goes to the layer with the largest log-gain per unit cost.
    Near full retention log-gain equals the relative error removed; near rank 1 it
    grows without bound, so no layer is starved because its spectrum is flat.
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
    return ranks | _greedy(active, spectra, cost, spent, allowed)


def _greedy(active, spectra, cost: _Costs, spent: float, allowed: float) -> dict[str, int]:
    """From rank 1 everywhere (`spent` so far), give each next direction to the layer with
    the largest log-retention gain per unit cost while the budget `allowed` affords it."""
    retained = {}
    for lp in active:
        s2 = spectra[lp.path] ** 2
        retained[lp.path] = np.maximum(np.cumsum(s2) / max(float(s2.sum()), 1e-30), 1e-30)

    def push(heap, lp, r):  # offer direction r+1 of this layer
        keep = retained[lp.path]
        if r < len(keep):
            gain = np.log(keep[r] / keep[r - 1])
            heapq.heappush(heap, (-gain / cost.unit(lp), lp.path))

    ranks = {lp.path: 1 for lp in active}
    lookup = {lp.path: lp for lp in active}
    heap = []
    for lp in active:
        push(heap, lp, 1)
    while heap:
        _, path = heapq.heappop(heap)
        lp, r = lookup[path], ranks[path]
        if not fits(*lp.matrix_shape, r + 1):
            # Past break-even the exact dense layer is cheaper than rank r+1.
            extra = cost.dense(lp) - r * cost.unit(lp)
            if spent + extra <= allowed:
                ranks[path] = min(lp.matrix_shape)
                spent += extra
            continue
        if spent + cost.unit(lp) > allowed:
            continue
        ranks[path] = r + 1
        spent += cost.unit(lp)
        push(heap, lp, r + 1)
    return ranks
