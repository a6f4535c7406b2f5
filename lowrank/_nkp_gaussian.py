"""NKP for Gaussian inputs (see lowrank/_nkp.py): the per-row fit of (scale, bias) on
the closed-form objective, and the Riemannian descent of the row space P."""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._gaussian_expectations import expected_sq_diff, expected_square, relu_centred_sq_diff

TINY_COSINE = 1e-6  # rows this close to orthogonal to P get w'_i = 0 (bias only)


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
    move_tau = (cosine > TINY_COSINE).astype(tau.dtype)
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


def improves(new, old):
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
def gaussian_nkp(weight, bias, spectral, input_scale, *, activation, fit_bias, iterations):
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
        better = jnp.logical_or(~move, improves(jnp.sum(cerrors), jnp.sum(errors)))
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
    scale = jnp.where(cosine > TINY_COSINE, tau / jnp.where(proj_norm > 0, proj_norm, 1.0), 0.0)
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
