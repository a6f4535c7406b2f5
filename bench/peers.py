"""The methods a user would otherwise pick, as `lowrank` initializers, for bench/.

Each peer is an initializer object (`calibration` + `__call__(problem, *, key)`), so it
runs through `lowrank.factorize(model, plan=uniform_plan(...), init=Peer(),
calibration=..., sequential=False)`: every layer is fitted on the dense model's own
inputs, as the papers do. They are measured next to the project's inits, never used
as one.

- `PlainSVD`: truncated SVD of the weight, no data.
- `SVDLLM`: SVD-LLM (Wang et al., arXiv:2403.07378; github AIoT-MLSys-Lab/SVD-LLM),
  the "SVD-LLM (W)" variant: truncation-aware data whitening only, without the paper's
  optional parameter update (sequential low-rank fine-tuning of u and v).
  S = Cholesky(XᵀX) with XᵀX summed over the calibration rows (uncentred, as their
  forward hook accumulates it); if XᵀX is not positive definite, it is shifted by
  (1e-6 - λ_min)·I first, their fallback; S⁻¹ by inversion, with 1e-6·I added if S is
  singular. Then the SVD of W·S, truncated, W' = U_r Σ_r V_rᵀ S⁻¹ (√Σ_r on each side).
  The bias is kept as it is.
- `ASVD`: ASVD (Yuan et al., arXiv:2312.05821; github hahnyuan/ASVD4LLM), activation-
  aware SVD with their default "abs_mean" scaling: s_j = mean|x_j|^α + 1e-6 (α = 0.5),
  the SVD of W·diag(s), W' = [W diag(s)]_r diag(s)⁻¹ (√Σ on each side), bias kept.
  Their code sums the per-sample mean over calibration samples; that only multiplies
  s by a constant, which the truncation ignores (but for the 1e-6), so we take the
  mean over all rows.

Precision: Grams accumulate in float32 as in their hooks; Cholesky, inverse and the
SVDs run in float64 (SVD-LLM: double Cholesky, float32 SVD; ASVD: float32
`torch.svd_lowrank(q=rank)`, a randomized approximation of the exact truncated SVD we
take). Both choices can only help the peers.

Ranks: both papers give every layer the same parameter ratio, rank =
int(m·n·ratio / (m + n)) (`uniform_plan`). ASVD's sensitivity-based allocation (their
`calib_sensitivity_ppl` + `binary_search_truncation_rank`) is `asvd_sensitivity_plan`.

The calibration rows are what `lowrank.factorize` records: at most
`lowrank._factorize.MAX_CALIBRATION_ROWS` rows per layer, drawn uniformly from all the
calibration tokens (or conv patches); the project's inits see the same rows.
"""

from collections.abc import Callable, Sequence

import equinox as eqx
import jax.numpy as jnp
import numpy as np

import lowrank
from recipes.policy import module_at

from ._peer_inits import ASVD as ASVD
from ._peer_inits import SVDLLM as SVDLLM
from ._peer_inits import PlainSVD as PlainSVD
from ._peer_inits import ScaledASVD as ScaledASVD
from ._peer_inits import _needs_inputs
from ._peer_inits import asvd_factors as asvd_factors
from ._peer_inits import asvd_scale as asvd_scale
from ._peer_inits import svdllm_whitening as svdllm_whitening


def uniform_ranks(model, ratio: float, *, target) -> dict[str, int]:
    """The same parameter ratio for every selected layer, the papers' rank rule:
    rank = int(m·n·ratio / (m + n)), at least 1.

    Args:
        model: the dense model.
        ratio: parameters kept per layer, in (0, 1).
        target: `lowrank` target pattern of the layers to compress.

    Returns:
        {path: rank}.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio!r}; e.g. 0.8 keeps 80% per layer")
    ranks = {}
    for lp in lowrank.plan(model, rank=1, target=target).layers:
        if lp.factorizable:
            m, n = lp.matrix_shape
            ranks[lp.path] = max(1, int(m * n * ratio / (m + n)))
    return ranks


def plan_with_ranks(model, ranks: dict[str, int | None], *, target) -> lowrank.Plan:
    """A `lowrank.Plan` over the `target` layers with the given rank per path (None or a
    missing path: the layer stays dense)."""
    plan = lowrank.plan(model, rank=1, target=target)
    for lp in plan.layers:
        plan = plan.with_rank(lp.path, ranks.get(lp.path))
    return plan


def uniform_plan(model, ratio: float, *, target) -> lowrank.Plan:
    """`plan_with_ranks` of `uniform_ranks`: the peers' plan at one parameter ratio."""
    return plan_with_ranks(model, uniform_ranks(model, ratio, target=target), target=target)


class _ScaleRecorder:
    """An initializer that only records ASVD's mean|x| per layer (returns rank-1 SVDs)."""

    calibration = "required"

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.scales: dict[str, np.ndarray] = {}

    def __call__(self, problem, *, key=None):
        self.scales[problem.path] = asvd_scale(_needs_inputs(problem, "ASVD"), self.alpha)
        return PlainSVD()(problem)


def activation_scales(model, calibration, *, target, alpha: float = 0.5) -> dict[str, np.ndarray]:
    """ASVD's channel scales s = mean|x|^α + 1e-6 of every `target` layer, from one
    calibration run of the dense model.

    Args:
        model: the dense model.
        calibration: as `lowrank.factorize`'s.
        target: the layers.
        alpha: ASVD's exponent.

    Returns:
        {path: s}.
    """
    recorder = _ScaleRecorder(alpha)
    plan = plan_with_ranks(
        model, dict.fromkeys(uniform_ranks(model, 0.5, target=target), 1), target=target
    )
    lowrank.factorize(model, plan=plan, init=recorder, calibration=calibration, sequential=False)
    return recorder.scales


ASVD_RATIOS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # their param_ratio_candidates


def _asvd_rank(shape: tuple[int, int], ratio: float) -> int:
    m, n = shape
    return max(1, int(m * n * ratio) // (m + n))  # their SVDLinear.from_linear


def _merged(model, path: str, factors: lowrank.Factors):
    """`model` with the layer at `path` given weight u @ v: the low-rank function in the
    dense structure, so that trial models share one compilation."""
    layer = module_at(model, path)
    weight = np.asarray(factors.u, np.float64) @ np.asarray(factors.v, np.float64)
    weight = jnp.asarray(weight.reshape(layer.weight.shape), layer.weight.dtype)
    return eqx.tree_at(lambda m: module_at(m, path).weight, model, weight)


def asvd_sensitivity(
    model,
    *,
    target,
    scales: dict[str, np.ndarray],
    loss: Callable[[object], float],
    candidates: Sequence[float] = ASVD_RATIOS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[float, float]]:
    """ASVD's `calib_sensitivity_ppl`: for every layer and candidate ratio, factorize
    that layer alone (ASVD with `scales`) and measure `loss` (in the paper, perplexity
    on the calibration data).

    Args:
        model: the dense model.
        target: the layers.
        scales: ASVD scales per path (`activation_scales`).
        loss: loss(model) -> float on calibration data; called len(layers) ×
            len(candidates) times on models of the dense structure (jit it once).
        candidates: per-layer parameter ratios tried, each in (0, 1).
        progress: called with a line per trial, if given.

    Returns:
        {path: {ratio: loss}}.
    """
    if not candidates or not all(0 < c < 1 for c in candidates):
        raise ValueError(f"candidates must be ratios in (0, 1), got {list(candidates)}")
    sensitivity: dict[str, dict[float, float]] = {}
    for path, shape in _shapes(model, target).items():
        sensitivity[path] = {}
        w = module_at(model, path).weight
        weight = jnp.asarray(np.asarray(w).reshape(w.shape[0], -1))
        for c in candidates:
            problem = lowrank.LayerProblem(path, weight, None, _asvd_rank(shape, c))
            trial = _merged(model, path, asvd_factors(problem, scales[path]))
            sensitivity[path][c] = float(loss(trial))
            if progress is not None:
                progress(f"ASVD sensitivity {path} ratio {c}: {sensitivity[path][c]:.5g}")
    return sensitivity


def _shapes(model, target) -> dict[str, tuple[int, int]]:
    plan = lowrank.plan(model, rank=1, target=target)
    return {lp.path: lp.matrix_shape for lp in plan.layers if lp.factorizable}


def asvd_sensitivity_plan(
    model, ratio: float, *, target, sensitivity: dict[str, dict[float, float]]
) -> lowrank.Plan:
    """ASVD's `binary_search_truncation_rank` under a parameter ratio.

    All (layer, ratio, loss) entries of `sensitivity` sorted by loss, descending; the
    entries from index k on give each layer the smallest ratio among its entries
    (layers without one stay dense), and k is binary-searched for the nominal
    parameter ratio Σ numel·ratio / Σ numel to meet `ratio`. Their search stops at the
    first k over the budget and uses the last midpoint; we take the last k within it,
    so ASVD never gets more parameters than the ratio.

    Args:
        model: the dense model.
        ratio: the parameter ratio of the selected layers to meet.
        target: the layers.
        sensitivity: from `asvd_sensitivity`.

    Returns:
        The plan (ranks int(numel·ratio) // (m + n), their rule).
    """
    shapes = _shapes(model, target)
    missing = sorted(set(shapes) - set(sensitivity))
    if missing:
        raise ValueError(
            f"no sensitivity for {missing[:3]}; run asvd_sensitivity with the same target"
        )
    entries = sorted(
        ((p, c, v) for p, d in sensitivity.items() if p in shapes for c, v in d.items()),
        key=lambda e: -e[2],
    )
    numel = {p: m * n for p, (m, n) in shapes.items()}
    total = sum(numel.values())

    def ratios_from(k):
        chosen = dict.fromkeys(shapes, 1.0)
        for p, c, _ in entries[k:]:
            chosen[p] = min(chosen[p], c)
        return chosen

    def nominal(k):
        return sum(numel[p] * c for p, c in ratios_from(k).items()) / total

    if nominal(0) > ratio:
        raise ValueError(
            f"ASVD's candidate ratios cannot reach ratio {ratio}: even the smallest "
            f"everywhere keeps {nominal(0):.3f}; add smaller candidates"
        )
    low, high = 0, len(entries)  # nominal grows with k: the largest k within ratio
    while low < high:
        mid = (low + high + 1) // 2
        if nominal(mid) <= ratio:
            low = mid
        else:
            high = mid - 1
    chosen = ratios_from(low)
    ranks = {p: None if c >= 1 else _asvd_rank(shapes[p], c) for p, c in chosen.items()}
    return plan_with_ranks(model, ranks, target=target)
