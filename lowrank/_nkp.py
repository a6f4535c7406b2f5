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
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._gaussian_expectations import expected_sq_diff, expected_square, relu_centred_sq_diff
from ._initializers import (
    Factors,
    Initializer,
    LayerProblem,
    register_initializer,
    top_singular_triplets,
)
from ._problem_checks import check_problem, relative_error
from ._whitened import (
    DEFAULT_RIDGE,
    check_ridge,
    reduced_rank_regression,
    whitened_truncation,
    whitening,
)

_TINY_COSINE = 1e-6  # rows this close to orthogonal to P get w'_i = 0 (bias only)
_RELAXATION = 0.1  # λ of the calibrated alternation (best of 0.01-10 on synthetic layers)
_MIN_ROWS_TO_HOLD_OUT = 40  # fewer calibration rows: no early stopping on held-out rows


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
            u, v, new_bias, num, den = _gaussian_nkp(
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
            _calibrated_nkp,
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


def affordable_iterations(iterations: int, m: int, n: int, rank: int) -> int:
    """At most 1.5·min(m, n)/r subspace steps of 4·m·n·r float32 flops each: about as much
    again as the spectral init itself (a float64 Gram matrix, 2·m·n·min(m, n) flops)."""
    return min(iterations, (3 * min(m, n)) // (2 * rank))


# ----------------------------------------------------------------------------- Gaussian


def row_errors(
    activation: Callable[[Array], Array],
    tau: Float[Array, " m"],
    beta: Float[Array, " m"],
    mean: Float[Array, " m"],
    std: Float[Array, " m"],
    cosine: Float[Array, " m"],
    *,
    centred: bool = False,
) -> Float[Array, " m"]:
    """e_i = E(σ(b_i + s‖w_i‖ξ1) - σ(b'_i + τ_i(ρ_i ξ1 + √(1-ρ_i²) ξ2)))² per row.

    `centred` (no bias anywhere) lets ReLU use the arc-cosine kernel directly.
    """
    if centred and activation is jax.nn.relu:
        return relu_centred_sq_diff(std, tau, cosine)
    return expected_sq_diff(activation, mean, std, beta, tau, cosine)


def fit_rows(
    errors_of: Callable[..., Float[Array, " m"]],
    tau: Float[Array, " m"],
    beta: Float[Array, " m"],
    mean: Float[Array, " m"],
    std: Float[Array, " m"],
    cosine: Float[Array, " m"],
    *,
    fit_bias: bool,
    steps: int,
) -> tuple[Float[Array, " m"], Float[Array, " m"], Float[Array, " m"]]:
    """Trust-region Newton on each row's (τ, b'), keeping per row the best of p, p+δ/4ᵏ.

    The Hessian is shifted until positive definite and the step clipped to half the
    pre-activation scale √(s²‖w_i‖² + b_i²), so non-convex rows (GELU near τ = 0) still
    descend. τ is frozen at 0 for rows (almost) orthogonal to the subspace, where no
    direction in P realizes it; b' is frozen unless `fit_bias`. `errors_of` is `row_errors`
    with the activation bound.
    """
    move_tau = (cosine > _TINY_COSINE).astype(tau.dtype)
    move_beta = jnp.full_like(tau, 1.0 if fit_bias else 0.0)
    tau = tau * move_tau
    errors = lambda t, b: errors_of(t, b, mean, std, cosine)
    grad = jax.grad(lambda t, b: jnp.sum(errors(t, b)), argnums=(0, 1))
    ones, zeros = jnp.ones_like(tau), jnp.zeros_like(tau)
    radius = 0.5 * jnp.sqrt(std**2 + mean**2) + 1e-30
    fractions = jnp.asarray([1.0, 0.25, 0.0625], tau.dtype)[:, None]

    def step(carry, _):
        t, b, e = carry
        # Rows are independent, so two Hessian-vector products give every row's 2x2 Hessian.
        tangents = (jnp.stack([ones, zeros]), jnp.stack([zeros, ones]))
        (gt, gb), (h_t, h_b) = jax.vmap(lambda dt, db: jax.jvp(grad, (t, b), (dt, db)))(*tangents)
        gt, gb = gt[0] * move_tau, gb[0] * move_beta
        htt = h_t[0] * move_tau + (1 - move_tau)
        hbb = h_b[1] * move_beta + (1 - move_beta)
        hbt = h_b[0] * move_tau * move_beta
        # Levenberg damping: shift the 2x2 Hessian until positive definite.
        lowest = (htt + hbb) / 2 - jnp.sqrt(((htt - hbb) / 2) ** 2 + hbt**2)
        shift = jnp.maximum(0.0, -lowest) + 1e-6 * (jnp.abs(htt) + jnp.abs(hbb)) + 1e-30
        a, d = htt + shift, hbb + shift
        det = a * d - hbt**2
        dt = -(d * gt - hbt * gb) / det
        db = -(a * gb - hbt * gt) / det
        clip = jnp.minimum(1.0, radius / jnp.maximum(jnp.sqrt(dt**2 + db**2), 1e-30))
        ct, cb = t + fractions * dt * clip, b + fractions * db * clip
        ce = jax.vmap(errors)(ct, cb)
        # Within rounding noise of the best, prefer the longest step: near the optimum the
        # errors differ by less than float precision, while the Newton step is exact.
        noise = 16 * jnp.finfo(e.dtype).eps * jnp.abs(e) + jnp.finfo(e.dtype).tiny
        pick = jnp.argmax(ce <= jnp.min(ce, axis=0) + noise, axis=0)
        take = lambda c: jnp.take_along_axis(c, pick[None], axis=0)[0]
        better = take(ce) <= e + noise
        return tuple(jnp.where(better, take(c), x) for c, x in ((ct, t), (cb, b), (ce, e))), None

    (tau, beta, e), _ = jax.lax.scan(step, (tau, beta, errors(tau, beta)), None, length=steps)
    return tau, beta, e


def _improves(new, old):
    """new < old by more than rounding noise, so float error cannot make NKP drift."""
    return new < old * (1 - 16 * jnp.finfo(old.dtype).eps)


def _cosines(wq, sq_norms):
    safe = jnp.where(sq_norms > 0, sq_norms, 1.0)
    return jnp.where(sq_norms > 0, jnp.sqrt(jnp.minimum(jnp.sum(wq**2, axis=1) / safe, 1.0)), 0.0)


def _polar(x):
    """The orthonormal factor of x (n×r): x (xᵀx)^-½, via an r×r eigen-decomposition."""
    eig, vec = jnp.linalg.eigh(x.T @ x)
    return x @ ((vec / jnp.sqrt(eig)) @ vec.T)


@functools.partial(jax.jit, static_argnames=("activation", "fit_bias", "iterations"))
def _gaussian_nkp(weight, bias, spectral, input_scale, *, activation, fit_bias, iterations):
    centred = bias is None
    bias = jnp.zeros(weight.shape[0], weight.dtype) if centred else bias
    errors_of = functools.partial(row_errors, activation, centred=centred)
    sq_norms = jnp.sum(weight**2, axis=1)
    std = input_scale * jnp.sqrt(sq_norms)
    # Spectral start, W' = W q qᵀ (c_i = 1); QR completes directions with σ = 0 (zero rows).
    q, _ = jnp.linalg.qr(spectral)
    wq = weight @ q
    cosine = _cosines(wq, sq_norms)

    def gradient(q, wq, tau, beta, cosine):
        slope = jax.grad(lambda c: jnp.sum(errors_of(tau, beta, bias, std, c)))(cosine)
        g = slope / (jnp.maximum(cosine, 1e-3) * jnp.where(sq_norms > 0, sq_norms, 1.0))
        full = weight.T @ (g[:, None] * wq)
        return full - q @ (q.T @ full)

    def propose(q, wq, tau, beta, cosine, lr):
        direction = gradient(q, wq, tau, beta, cosine)
        first = 0.3 * math.sqrt(q.shape[1]) / jnp.maximum(jnp.linalg.norm(direction), 1e-30)
        lr = jnp.where(lr > 0, lr, first)  # the first step turns P by roughly 0.3 rad
        candidate = _polar(q - lr * direction)
        cwq = weight @ candidate
        return candidate, cwq, _cosines(cwq, sq_norms), lr

    def step(carry, move):
        # move=False: polish (τ, b') on the current subspace; move=True: a subspace step.
        q, wq, tau, beta, cosine, errors, lr = carry
        stay = lambda *_: (q, wq, cosine, lr)
        candidate, cwq, ccos, lr = jax.lax.cond(move, propose, stay, q, wq, tau, beta, cosine, lr)
        ctau, cbeta, cerrors = fit_rows(
            errors_of, tau, beta, bias, std, ccos, fit_bias=fit_bias, steps=2
        )
        # Polishing only lowers each row's error; a subspace step must lower the total.
        better = jnp.logical_or(~move, _improves(jnp.sum(cerrors), jnp.sum(errors)))
        keep = lambda new, old: jnp.where(better, new, old)
        state = (candidate, cwq, ctau, cbeta, ccos, cerrors)
        state = tuple(map(keep, state, (q, wq, tau, beta, cosine, errors)))
        lr = jnp.where(move, jnp.where(better, lr * 1.5, lr * 0.3), lr)
        return (*state, lr), None

    # Start at spectral (c_i = 1, b' = b); the first step is always kept (errors = inf).
    carry = (q, wq, cosine * std, bias, cosine, jnp.full_like(std, jnp.inf), jnp.zeros_like(std[0]))
    moves = jnp.asarray([False] * 4 + [True] * iterations + [False] * 4)
    (q, wq, tau, beta, cosine, errors, _), _ = jax.lax.scan(step, carry, moves)
    # w'_i = c_i·P w_i with c_i = τ_i / (s‖P w_i‖); then balance the two factors.
    proj_norm = input_scale * cosine * jnp.sqrt(sq_norms)
    scale = jnp.where(cosine > _TINY_COSINE, tau / jnp.where(proj_norm > 0, proj_norm, 1.0), 0.0)
    u, v = _balanced(scale[:, None] * wq, q)
    target = jnp.sum(expected_square(activation, bias, std))
    return u, v, beta, jnp.sum(errors), target


def _balanced(b, q):
    """u, v with u @ v = b @ qᵀ and equal singular values (√s) on both sides, as spectral.

    From the r×r eigen-decomposition of bᵀb (b = U S Vᵀ gives u = b V / √S, v = √S Vᵀ qᵀ),
    cheaper than an SVD of the m×r matrix b; directions with S = 0 are dropped.
    """
    eig, vec = jnp.linalg.eigh(b.T @ b)
    half = jnp.sqrt(jnp.sqrt(jnp.maximum(eig, 0.0)))
    alive = half > 0
    u = (b @ vec) * jnp.where(alive, 1.0 / jnp.where(alive, half, 1.0), 0.0)
    return u, (half[:, None] * vec.T) @ q.T


# ----------------------------------------------------------------------------- calibrated


def target_preactivations(
    activation: Callable[[Array], Array],
    y: Float[Array, "N m"],
    dense_pre: Float[Array, "N m"],
    current: Float[Array, "N m"],
    lam: float,
    steps: int = 3,
) -> Float[Array, "N m"]:
    """Elementwise argmin_z (y - σ(z))² + λ(z - current)², y = σ(dense_pre).

    Gauss–Newton from two starts, the current pre-activation and the dense one (where
    σ(z) = y already), keeping the best of the four points; exact for ReLU.
    """

    def objective(z):
        return (y - activation(z)) ** 2 + lam * (z - current) ** 2

    def gauss_newton(z):
        value, slope = jax.jvp(activation, (z,), (jnp.ones_like(z),))
        return z - (slope * (value - y) + lam * (z - current)) / (slope**2 + lam)

    best, best_value = current, objective(current)
    for start in (current, dense_pre):
        z = start
        for _ in range(steps):
            z = gauss_newton(z)
        for point in (start, z):
            value = objective(point)
            better = value < best_value
            best, best_value = jnp.where(better, point, best), jnp.where(better, value, best_value)
    return best


def held_out_rows(num_rows: int) -> np.ndarray | None:
    """A mask of a fifth of the rows in contiguous chunks (rows of one image or sequence
    stay together), or None when there are too few rows to spare any."""
    if num_rows < _MIN_ROWS_TO_HOLD_OUT:
        return None
    chunk = num_rows // 20
    return (np.arange(num_rows) // chunk) % 5 == 4


@functools.partial(
    jax.jit, static_argnames=("rank", "activation", "fit_bias", "iterations", "ridge")
)
def _calibrated_nkp(
    weight, bias, fit, held, stop, *, rank, activation, fit_bias, iterations, ridge
):
    """Alternations fitted on the `fit` rows, (inputs, dense inputs or None: the same).

    Returns the iterate that is best on the fit rows among the start and the first `stop`
    alternations (u, v, b', its loss, the target's energy), and the loss of the start and
    of each alternation on the `held` rows (zeros when `held` is None).
    """
    inputs, dense_inputs = fit
    dense_pre = (inputs if dense_inputs is None else dense_inputs) @ weight.T + bias
    y = activation(dense_pre)
    mean, basis, eig = whitening(inputs, centre=fit_bias)
    centred = inputs - mean

    def regression(z):
        """Rank-r least squares of z on the inputs: u, v and the bias (fitted or kept)."""
        offset = jnp.mean(z, axis=0) if fit_bias else bias
        u, v = reduced_rank_regression(
            z - offset, centred, basis, eig, rank, prior=weight, ridge=ridge
        )
        return u, v, offset - u @ (v @ mean) if fit_bias else bias

    if dense_inputs is None:  # the whitened SVD
        u, v = whitened_truncation(weight, basis, eig, rank)
        new_bias = bias + (weight - u @ v) @ mean if fit_bias else bias
    else:
        u, v, new_bias = regression(dense_pre)

    def loss_on(x, target):
        return lambda u, v, b: jnp.sum((target - activation((x @ v.T) @ u.T + b)) ** 2)

    loss = loss_on(inputs, y)
    if held is None:
        held_loss = lambda u, v, b: jnp.zeros((), weight.dtype)
    else:
        held_x, held_dense = held
        held_y = activation((held_x if held_dense is None else held_dense) @ weight.T + bias)
        held_loss = loss_on(held_x, held_y)

    def alternate(i, state):
        u, v, new_bias, best, held_losses = state
        current = (inputs @ v.T) @ u.T + new_bias
        z = target_preactivations(activation, y, dense_pre, current, _RELAXATION)
        u, v, new_bias = regression(z)
        candidate = (u, v, new_bias, loss(u, v, new_bias))
        better = jnp.logical_and(i < stop, _improves(candidate[3], best[3]))
        best = jax.tree.map(lambda a, b: jnp.where(better, a, b), candidate, best)
        return u, v, new_bias, best, held_losses.at[i + 1].set(held_loss(u, v, new_bias))

    best = (u, v, new_bias, loss(u, v, new_bias))
    held_losses = jnp.zeros(iterations + 1, weight.dtype).at[0].set(held_loss(u, v, new_bias))
    state = jax.lax.fori_loop(0, iterations, alternate, (u, v, new_bias, best, held_losses))
    u, v, new_bias, value = state[3]
    return u, v, new_bias, value, jnp.sum(y**2), state[4]


register_initializer("nkp", NKP())
