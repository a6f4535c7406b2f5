"""Input checks shared by the data- and function-aware initializers (NKP, whitened)."""

import numpy as np

from ._initializers import LayerProblem


def check_problem(problem: LayerProblem, init: str) -> None:
    """Raise a ValueError naming the layer and the fix when `problem` cannot be solved."""
    m, n = problem.weight.shape
    if not 1 <= problem.rank <= min(m, n):
        raise ValueError(
            f"rank {problem.rank} is outside [1, min({m}, {n})] for {problem.path}; "
            f"choose a rank between 1 and {min(m, n)}"
        )
    if problem.inputs is not None and (
        problem.inputs.ndim != 2 or problem.inputs.shape[1] != n or problem.inputs.shape[0] == 0
    ):
        raise ValueError(
            f"calibration inputs for {problem.path} have shape {problem.inputs.shape}; "
            f"expected (samples >= 1, {n}) in the layer's input space"
        )
    if problem.dense_inputs is not None and (
        problem.inputs is None or problem.dense_inputs.shape != problem.inputs.shape
    ):
        raise ValueError(
            f"dense_inputs for {problem.path} must pair row by row with inputs, got "
            f"{problem.dense_inputs.shape} for inputs "
            f"{None if problem.inputs is None else problem.inputs.shape}"
        )
    path = problem.path
    for array, what in (
        (
            problem.weight,
            f"layer {path} has non-finite weights (NaN/inf); fix or re-initialize the dense model",
        ),
        (problem.bias, f"layer {path} has a non-finite bias (NaN/inf); fix the dense model"),
        (
            problem.inputs,
            f"calibration inputs for {path} contain NaN/inf; clean the calibration data",
        ),
        (
            problem.dense_inputs,
            f"dense-model inputs for {path} contain NaN/inf; clean the calibration data",
        ),
    ):
        if array is not None and not np.isfinite(np.asarray(array)).all():
            raise ValueError(f"{what} before init={init!r}")


def relative_error(num, den):
    """num/den for squared errors, 0 when both vanish (a layer that always outputs zero)."""
    num, den = float(num), float(den)
    if den > 0:
        return num / den
    return 0.0 if num == 0 else float(np.inf)
