"""Whitened SVD (SVD-LLM): the rank-r W' minimizing ‖(W - W')x‖² over calibration inputs.

With S any square root of the input second moment (S Sᵀ = XᵀX/N), ‖(W - W')X‖ =
‖(W - W')S‖·√N, so the optimum is [W S]_r S⁻¹. As SVD-LLM, the fit takes S from a
Cholesky factor; where XᵀX is close to singular (fewer samples than dimensions, constant
features) it takes S = E·Λ^½ from the eigen-decomposition with eigenvalues floored at
1e-6·λ_max instead, a stable answer: unseen directions are then weighted like a tiny
ridge instead of dividing by zero. Both give the same W' whenever XᵀX is non-singular.
Calibrated NKP, which reuses its basis over many regressions, always takes the eigen
form (`whitening`). When the layer has a bias, the bias absorbs the mean input, so we
whiten the centred covariance and correct b' = b + (W - W')·mean(x).

Sequential calibration (`problem.dense_inputs`): earlier layers are already factorized,
so this layer sees inputs x̃ while the dense layer saw x on the same rows. The target is
then the dense output z = Wx + b, and W' is the reduced-rank regression of z on x̃ (the
whitened truncation of the least-squares map), with b' absorbing the mean shift: this
corrects, layer by layer, the error that earlier factorizations let through.
"""

import functools
import math
import weakref

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._initializers import (
    Factors,
    Initializer,
    LayerProblem,
    register_initializer,
)
from ._problem_checks import check_problem, relative_error

_EIGEN_FLOOR = 1e-6
DEFAULT_RIDGE = 0.025  # δ / (mean input variance · inputs / rows) in regressions
ERROR_ROWS = 4096  # rows the reported function error is measured on
MOMENT_CHUNK = 4096  # rows per float32 product of the input moments


def check_ridge(ridge: float, name: str) -> None:
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"{name} ridge must be a finite number >= 0, got {ridge}")


def whitening(
    inputs: Float[Array, "N n"], *, centre: bool
) -> tuple[Float[Array, " n"], Float[Array, "n n"], Float[Array, " n"]]:
    """(mean, E, λ) with E·diag(λ)·Eᵀ ≈ the inputs' (centred if `centre`) second moment.

    λ is floored at 1e-6·max(λ) (or 1 when every input is zero), so λ > 0 always.
    """
    mean = jnp.mean(inputs, axis=0) if centre else jnp.zeros(inputs.shape[1], inputs.dtype)
    x = inputs - mean
    basis, eig = floored_eigh(x.T @ x / x.shape[0])
    return mean, basis, eig


def input_moments(inputs, dense_inputs=None, *, centre: bool) -> tuple:
    """What the whitened fit needs of its rows, shared by the layers that read the same
    input (q/k/v, gate/up): (mean, C, dense mean, cross) with C the inputs' (centred if
    `centre`) second moment and, when the dense model's inputs differ (`dense_inputs`
    not None), their mean and the cross moment E[(x - x̄)(x̃ - x̃̄)ᵀ] (else None, None).
    Float64 numpy on the host, accumulated from float32 products of `MOMENT_CHUNK` rows
    (`_moment`)."""
    x = np.asarray(inputs)
    mean = x.mean(0, dtype=np.float64) if centre else None
    gram = _moment(x, mean, x, mean)
    as_mean = lambda m: np.zeros(x.shape[1]) if m is None else m  # None: not centred
    if dense_inputs is None:
        return as_mean(mean), gram, None, None
    dense = np.asarray(dense_inputs)
    dense_mean = dense.mean(0, dtype=np.float64) if centre else None
    return as_mean(mean), gram, as_mean(dense_mean), _moment(dense, dense_mean, x, mean)


def floored_eigh(gram: Float[Array, "n n"]) -> tuple[Float[Array, "n n"], Float[Array, " n"]]:
    """(E, λ) with E·diag(λ)·Eᵀ = `gram`, λ floored at 1e-6·max(λ) (or 1 when `gram` is
    zero), so λ > 0 always; in the array's own namespace (numpy on the host, or
    jax.numpy inside a jitted fit)."""
    xp = gram.__array_namespace__()
    eig, basis = xp.linalg.eigh(gram)
    top = xp.max(eig)
    return basis, xp.maximum(eig, xp.where(top > 0, _EIGEN_FLOOR * top, 1.0))


def reuse_last(fn):
    """`fn(gram, *args)`, reusing its last result when called again on the same array (by
    identity) with equal other arguments: the layers that read one input (q/k/v,
    gate/up) share one `shared_input_moments`, so one decomposition serves them all."""
    last = []

    @functools.wraps(fn)
    def reused(gram, *args):
        if not last or last[0] is not gram or last[1] != args:
            last[:] = [gram, args, fn(gram, *args)]
        return last[2]

    return reused


def _moment(a, a_mean, b, b_mean) -> np.ndarray:
    """E[(a - ā)(b - b̄)ᵀ] over the rows (means None: not centred), in float64: each
    `MOMENT_CHUNK` rows' product in float32 (half the time of a float64 product on the
    host's BLAS), the chunks summed in float64, so that the rounding error stays that of
    one chunk's float32 sums."""

    def part(x, mean, rows):
        x = x[rows]
        return np.asarray(x if mean is None else x - mean, np.float32)

    total = np.zeros((a.shape[1], b.shape[1]))
    for start in range(0, len(a), MOMENT_CHUNK):
        rows = slice(start, start + MOMENT_CHUNK)
        a_part = part(a, a_mean, rows)
        total += a_part.T @ (a_part if b is a else part(b, b_mean, rows))
    return total / len(a)


def whitened_truncation(
    weight: Float[Array, "m n"], basis: Float[Array, "n n"], eig: Float[Array, " n"], rank: int
) -> tuple[Float[Array, "m r"], Float[Array, "r n"]]:
    """u, v with u @ v = [W S]_r S⁻¹ for S = E·Λ^½, √singular values split to both sides."""
    root = jnp.sqrt(eig)
    return _root_truncation((weight @ basis) * root, (basis / root).T, rank)


def reduced_rank_regression(
    targets: Float[Array, "N m"],
    centred: Float[Array, "N n"],
    basis: Float[Array, "n n"],
    eig: Float[Array, " n"],
    rank: int,
    *,
    prior: Float[Array, "m n"],
    ridge: float,
) -> tuple[Float[Array, "m r"], Float[Array, "r n"]]:
    """u, v of rank r minimizing Σ_k ‖t_k - u v x_k‖² + N·δ‖u v - prior‖² over the N rows
    t_k of `targets` and x_k of `centred` (n inputs, second moment E·diag(λ)·Eᵀ), with
    δ = ridge·mean(λ)·n/N.

    The optimum is the truncation of L = (E[t xᵀ] + δ·prior)·(EΛEᵀ + δI)⁻¹ in the metric
    EΛEᵀ + δI. The ridge pulls the fit towards the dense weight (`prior`) in directions
    the calibration rows barely cover; it grows with n/N, as the variance of a least-
    squares fit does: with fewer rows than inputs, plain least squares fits them exactly
    and generalizes poorly.
    """
    rows = centred.shape[0]
    cross = targets.T @ centred / rows
    delta = ridge * jnp.mean(eig) * basis.shape[0] / rows
    metric = eig + delta
    fit = (((cross + delta * prior) @ basis) / metric) @ basis.T
    return whitened_truncation(fit, basis, metric, rank)


def _whitened(weight, bias, moments, *, rank, rows, ridge):
    """u, v, b' (b' = None without a bias) from the layer's `input_moments`, all float64
    numpy on the host, in the basis of a square root S of the metric (`_square_root`): on
    the dense inputs [W S]_r S⁻¹; in the regression onto the dense outputs the truncation
    of (W·cross + δW)·(C + δI)⁻¹ in the metric C + δI (`reduced_rank_regression`), whose
    product with S is (W·cross + δW)·S⁻ᵀ."""
    mean, gram, dense_mean, cross = moments
    if cross is None:  # the inputs are the dense ones
        root, inverse = _square_root(gram, 0.0)
        u, v = _root_truncation(weight @ root, inverse, rank)
        return u, v, None if bias is None else bias + (weight - u @ v) @ mean
    delta = ridge * np.trace(gram) / rows  # ridge · mean(λ) · n / rows
    root, inverse = _square_root(gram, delta)
    u, v = _root_truncation((weight @ cross + delta * weight) @ inverse.T, inverse, rank)
    return u, v, None if bias is None else bias + weight @ dense_mean - u @ (v @ mean)


@reuse_last
def _square_root(gram: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """(S, S⁻¹) with S Sᵀ = C + δI: the Cholesky factor (a sixth of an eigen-
    decomposition's time at n = 1536), or, where C is too close to singular for it (a
    pivot below 1e-6 · max diag C, so an eigenvalue is too), E·(λ + δ)^½ with λ floored
    as `whitening` floors it. The two give the same fit wherever the floor is inactive."""
    metric = gram + delta * np.eye(len(gram))
    try:
        root = np.linalg.cholesky(metric)
        if np.min(np.diag(root)) ** 2 >= _EIGEN_FLOOR * np.max(np.diag(gram)):
            return root, np.linalg.inv(root)
    except np.linalg.LinAlgError:
        pass
    basis, eig = floored_eigh(gram)
    root = np.sqrt(eig + delta)
    return basis * root, (basis / root).T


def _root_truncation(product, inverse, rank):
    """u, v with u @ v = [M S]_r S⁻¹ from `product` = M S and `inverse` = S⁻¹, √singular
    values split to both sides (in the arrays' namespace, as `floored_eigh`)."""
    xp = product.__array_namespace__()
    U, s, Vt = xp.linalg.svd(product, full_matrices=False)
    half = xp.sqrt(s[:rank])
    return U[:, :rank] * half, (half[:, None] * Vt[:rank]) @ inverse


def calibration_error(activation, weight, bias, u, v, new_bias, inputs, dense_inputs=None):
    """Σ‖σ(Wx+b) - σ(u v x̃+b')‖² and Σ‖σ(Wx+b)‖² over the calibration rows (x̃ the
    inputs, x the dense inputs, the same unless calibration is sequential), or over
    `ERROR_ROWS` of them, evenly spaced, when there are more (their ratio is then an
    estimate, within a few percent); the products in float32 numpy, the sums in float64."""
    step = -(-len(inputs) // ERROR_ROWS)
    host = lambda a: 0.0 if a is None else np.asarray(a, np.float32)
    x = host(inputs[::step])
    dense = x if dense_inputs is None else host(dense_inputs[::step])
    target = dense @ host(weight).T + host(bias)
    approx = (x @ host(v).T) @ host(u).T + host(new_bias)
    if activation is not None:
        target, approx = (np.asarray(activation(jnp.asarray(z))) for z in (target, approx))
    residual = (target - approx).astype(np.float64)
    return np.sum(residual**2), np.sum(target.astype(np.float64) ** 2)


class Whitened(Initializer):
    """Activation-aware SVD from calibration inputs (SVD-LLM whitening), bias-corrected.

    `function_error` is the relative error of the layer's output σ(Wx + b) on the
    calibration inputs (σ = `problem.activation`, the identity when unknown; on 4,096
    of them, evenly spaced, when there are more).

    Args:
        ridge: with sequential calibration, how strongly the regression onto the
            dense outputs is pulled towards the dense weight, in units of the mean
            input variance times inputs per row (see `reduced_rank_regression`);
            unused on the dense model's own inputs.

    Returns:
        Called on a `LayerProblem` (`whitened(problem, key=key)`), the layer's
        `Factors`; the problem must carry calibration inputs.
    """

    ridge: float = eqx.field(default=DEFAULT_RIDGE, static=True)

    calibration = "required"

    def __check_init__(self):
        check_ridge(self.ridge, "Whitened")

    def __call__(self, problem: LayerProblem, *, key: PRNGKeyArray) -> Factors:
        del key
        check_problem(problem, "whitened")
        if problem.inputs is None:
            raise ValueError(
                f"init 'whitened' needs calibration inputs for {problem.path}; pass "
                "calibration= to factorize (or use init='spectral')"
            )
        dtype = jnp.promote_types(problem.weight.dtype, jnp.float32)
        centre = problem.bias is not None
        f64 = lambda a: None if a is None else np.asarray(a, np.float64)
        u, v, new_bias = _whitened(
            f64(problem.weight),
            f64(problem.bias),
            shared_input_moments(problem.inputs, problem.dense_inputs, centre=centre),
            rank=problem.rank,
            rows=problem.inputs.shape[0],
            ridge=self.ridge,
        )
        cast = lambda a: None if a is None else jnp.asarray(a, dtype)
        u, v, new_bias = cast(u), cast(v), cast(new_bias)
        num, den = calibration_error(
            problem.activation,
            problem.weight,
            problem.bias,
            u,
            v,
            new_bias,
            problem.inputs,
            problem.dense_inputs,
        )
        return Factors(u, v, new_bias, relative_error(num, den))

    def __repr__(self):
        return "whitened"


# The last `input_moments`, with weak references to the rows they were computed from
# (kept by identity for the next layer: the calibration pass hands layers that read the
# same input one array; nothing here keeps the rows alive).
_last_moments: list = [None, None, None, None]  # ref(inputs), ref(dense inputs), centre, moments


def shared_input_moments(inputs, dense_inputs=None, *, centre: bool) -> tuple:
    """`input_moments`, reused when the rows are the previous call's (by identity)."""
    rows, dense, kept_centre, moments = _last_moments
    same = (
        rows is not None
        and rows() is inputs
        and (dense() if dense is not None else None) is dense_inputs
        and kept_centre == centre
    )
    if not same:
        moments = input_moments(inputs, dense_inputs, centre=centre)
        dense_ref = None if dense_inputs is None else weakref.ref(dense_inputs)
        _last_moments[:] = [weakref.ref(inputs), dense_ref, centre, moments]
    return moments


register_initializer("whitened", Whitened())
