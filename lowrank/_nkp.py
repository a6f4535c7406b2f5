"""Nonlinear Kernel Projection (NKP): rank-r W' approximating the layer's *function*.

Objective: Σ_i E(σ(w_i·x + b_i) - σ(w'_i·x + b'_i))² over output rows i.

Gaussian inputs x ~ N(0, s²I). Row i's term depends on W' only through the means b_i,
b'_i, the scales s‖w_i‖, s‖w'_i‖ and the cosine between w_i and w'_i. Fix the row space
P (rank r) of W': for w'_i ∈ P the cosine is at most ρ_i = ‖P w_i‖/‖w_i‖, reached on the
direction P w_i, and by Price's theorem (d/dcov E[σ(z)σ(z')] = E[σ'(z)σ'(z')] ≥ 0 for
monotone σ) the best row is w'_i = c_i·P w_i. So W' = diag(c)·W·P, and:

1. per row, a two-parameter fit of (τ_i = c_i·s‖P w_i‖, b'_i) by damped Newton on the
   closed-form objective (for ReLU without bias it is τ_i = 2κ(ρ_i)·s‖w_i‖);
2. over P, Riemannian gradient descent on the Grassmannian, started at the spectral
   subspace: by the envelope theorem dE/dP = Wᵀ·diag(g)·W with g_i = (de_i/dρ_i)/(ρ_i‖w_i‖²)
   (a kernel-weighted projection), each step costing two m×n×r matmuls. A step is kept only
   if it lowers the objective, so NKP is never worse than the spectral subspace with the
   optimal per-row rescaling, which in turn is never worse than spectral (c_i = 1).

Calibration inputs (problem.inputs): the same objective on the real inputs. Start from the
whitened SVD, then alternate (Zhang et al. 2015's relaxation) target pre-activations
z* = argmin (y - σ(z))² + λ(z - z')² elementwise, and a reduced-rank regression of z* on x
(the whitened SVD of the least-squares map, bias free), keeping the best iterate. With
sequential calibration (problem.dense_inputs) the targets y = σ(W x + b) come from the
dense model's inputs x while the fit runs on the inputs x̃ the factorized model gives.
Two guards keep the fit from memorizing few calibration rows (a Linear after a flatten
sees one row per image, often fewer than its inputs): each regression is pulled towards
the dense weight by a ridge, and the number of alternations is chosen on held-out rows.
A layer known to feed no nonlinearity (activation `identity`) has the whitened fit's
objective, so it gets that fit (`Whitened`) and no alternations.
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray

from ._initializers import (
    Factors,
    Initializer,
    LayerProblem,
    register_initializer,
    top_singular_triplets,
)
from ._nkp_calibrated import calibrated_nkp, held_out_rows
from ._nkp_gaussian import affordable_iterations, gaussian_nkp
from ._problem_checks import check_problem, relative_error
from ._select import identity
from ._whitened import (
    DEFAULT_RIDGE,
    Whitened,
    check_ridge,
)


class NKP(Initializer):
    """Function-space initializer: rank-r W' minimizing E‖σ(Wx+b) - σ(W'x+b')‖².

    `function_error` is the relative function-space error: closed form under the
    Gaussian, empirical on calibration inputs; `Factors.assumes` says what it rests on
    (the Gaussian inputs, ReLU where the activation is unknown), and plans show it.

    Args:
        activation: σ after the layer; default `problem.activation`, else ReLU.
        input_scale: s in x ~ N(0, s²I) when no calibration inputs are given.
        iterations: subspace steps, capped at 1.5·min(m, n)/rank (cost ≈ 2 spectral
            inits).
        calibration_iterations: alternations on calibration inputs.
        fit_bias: also fit b' when the layer has a bias.
        ridge: pull of the calibrated regressions towards the dense weight, in units
            of the mean input variance times inputs per row (guards against fitting
            few calibration rows exactly; see `reduced_rank_regression`).

    Returns:
        Called on a `LayerProblem` (`nkp(problem, key=key)`), the layer's `Factors`.
    """

    activation: Callable[[Array], Array] | None = eqx.field(default=None, static=True)
    input_scale: float = eqx.field(default=1.0, static=True)
    iterations: int = eqx.field(default=16, static=True)
    calibration_iterations: int = eqx.field(default=8, static=True)
    fit_bias: bool = eqx.field(default=True, static=True)
    ridge: float = eqx.field(default=DEFAULT_RIDGE, static=True)

    calibration = "optional"

    def __check_init__(self):
        if not (math.isfinite(self.input_scale) and self.input_scale > 0):
            raise ValueError(f"NKP input_scale must be a positive number, got {self.input_scale}")
        if self.iterations < 0 or self.calibration_iterations < 0:
            raise ValueError(
                "NKP iterations and calibration_iterations must be >= 0, got "
                f"{self.iterations} and {self.calibration_iterations}"
            )
        check_ridge(self.ridge, "NKP")

    @property
    def fallback_activation(self) -> str | None:
        """What NKP assumes after a layer of unknown activation: ReLU, unless `activation`
        is given (then it applies to every layer)."""
        return "ReLU" if self.activation is None else None

    def __call__(self, problem: LayerProblem, *, key: PRNGKeyArray) -> Factors:
        del key
        check_problem(problem, "nkp")
        activation = self.activation or problem.activation or jax.nn.relu
        if problem.inputs is not None and activation is identity:  # a linear fit
            return Whitened(ridge=self.ridge)(problem, key=None)
        assumed = []
        if problem.inputs is None:
            assumed.append(f"inputs x ~ N(0, {self.input_scale:g}²·I)")
        if self.activation is None and problem.activation is None:
            assumed.append("ReLU after the layer (its activation is unknown)")
        weight = problem.weight.astype(jnp.promote_types(problem.weight.dtype, jnp.float32))
        fit_bias = self.fit_bias and problem.bias is not None
        bias = None if problem.bias is None else problem.bias.astype(weight.dtype)
        if problem.inputs is not None:
            with jax.enable_x64(True):  # moments of real activations are ill-conditioned
                f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))
                bias = jnp.zeros(weight.shape[0], jnp.float64) if bias is None else f64(bias)
                problem64 = dataclasses.replace(
                    problem,
                    inputs=f64(problem.inputs),
                    dense_inputs=None
                    if problem.dense_inputs is None
                    else f64(problem.dense_inputs),
                )
                out = self._calibrated(problem64, f64(weight), bias, activation, fit_bias)
                u, v, new_bias, num, den = (np.asarray(a) for a in out)
            u, v, new_bias = (jnp.asarray(a, weight.dtype) for a in (u, v, new_bias))
        else:
            m, n = weight.shape
            steps = affordable_iterations(self.iterations, m, n, problem.rank)
            _, _, vt = top_singular_triplets(weight, problem.rank)  # spectral's own subspace
            u, v, new_bias, num, den = gaussian_nkp(
                weight,
                bias,
                jnp.asarray(vt.T, weight.dtype),
                jnp.asarray(self.input_scale, weight.dtype),
                activation=activation,
                fit_bias=fit_bias,
                iterations=steps,
            )
        new_bias = new_bias if problem.bias is not None else None
        return Factors(u, v, new_bias, relative_error(num, den), ", ".join(assumed) or None)

    def _calibrated(self, problem, weight, bias, activation, fit_bias):
        """Calibrated NKP, its alternations stopped early where they stop generalizing:
        a first run fitted on four fifths of the rows counts the alternations that help
        on the held-out fifth; the final run on every row makes that many."""
        inputs = problem.inputs.astype(weight.dtype)
        dense = None if problem.dense_inputs is None else problem.dense_inputs.astype(weight.dtype)
        solve = functools.partial(
            calibrated_nkp,
            weight,
            bias,
            rank=problem.rank,
            activation=activation,
            fit_bias=fit_bias,
            iterations=self.calibration_iterations,
            ridge=self.ridge,
        )
        stop = self.calibration_iterations
        held = held_out_rows(inputs.shape[0])
        if held is not None and stop > 0:
            rows = lambda mask: (inputs[mask], None if dense is None else dense[mask])
            held_losses = solve(rows(~held), rows(held), jnp.int32(stop))[-1]
            stop = int(jnp.argmin(held_losses))
        return solve((inputs, dense), None, jnp.int32(stop))[:5]

    def __repr__(self):
        return "nkp"


register_initializer("nkp", NKP())
