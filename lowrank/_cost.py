"""The cost model: parameters and FLOPs of a layer at a rank, and the break-even rule."""

import math


def fits(m: int, n: int, r: int) -> bool:
    """Whether rank `r` factors u (m, r), v (r, n) cost fewer parameters than the dense
    (m, n) matrix: r·(m + n) < m·n. The one break-even predicate of the package; it
    also implies r < min(m, n).

    Args:
        m: output size of the matrix (rows).
        n: input size (columns; a conv's in_channels · prod(kernel)).
        r: the rank.

    Returns:
        True when factorizing at rank `r` saves parameters.
    """
    return r * (m + n) < m * n


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
