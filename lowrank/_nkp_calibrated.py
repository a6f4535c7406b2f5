"""NKP on calibration inputs (see lowrank/_nkp.py): alternate target pre-activations
and a reduced-rank regression on them, stopped early on held-out rows."""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._nkp_gaussian import improves
from ._whitened import reduced_rank_regression, whitened_truncation, whitening

_RELAXATION = 0.1  # λ of the calibrated alternation (best of 0.01-10 on synthetic layers)
_MIN_ROWS_TO_HOLD_OUT = 40  # fewer calibration rows: no early stopping on held-out rows


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
def calibrated_nkp(weight, bias, fit, held, stop, *, rank, activation, fit_bias, iterations, ridge):
    """Alternations fitted on the `fit` rows, (inputs, dense inputs or None: the same).

    Makes `stop` (at most `iterations`) alternations and returns the iterate that is best
    on the fit rows among the start and them (u, v, b', its loss, the target's energy),
    and the loss of the start and of each alternation on the `held` rows (zeros when
    `held` is None, and past `stop`).
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

    def pre_activation(x, u, v, b):
        return (x @ v.T) @ u.T + b

    def loss_at(z):
        """The loss on the fit rows of the pre-activations z."""
        return jnp.sum((y - activation(z)) ** 2)

    if held is None:
        held_loss = lambda u, v, b: jnp.zeros((), weight.dtype)
    else:
        held_x, held_dense = held
        held_y = activation((held_x if held_dense is None else held_dense) @ weight.T + bias)
        held_loss = lambda u, v, b: jnp.sum(
            (held_y - activation(pre_activation(held_x, u, v, b))) ** 2
        )

    def alternate(i, state):
        current, best, held_losses = state  # current: the last iterate's pre-activations
        z = target_preactivations(activation, y, dense_pre, current, _RELAXATION)
        u, v, new_bias = regression(z)
        current = pre_activation(inputs, u, v, new_bias)
        candidate = (u, v, new_bias, loss_at(current))
        better = improves(candidate[3], best[3])
        best = jax.tree.map(lambda a, b: jnp.where(better, a, b), candidate, best)
        return current, best, held_losses.at[i + 1].set(held_loss(u, v, new_bias))

    current = pre_activation(inputs, u, v, new_bias)
    best = (u, v, new_bias, loss_at(current))
    held_losses = jnp.zeros(iterations + 1, weight.dtype).at[0].set(held_loss(u, v, new_bias))
    steps = jnp.minimum(stop, iterations)  # a traced trip count: the loop ends at `stop`
    _, (u, v, new_bias, value), held_losses = jax.lax.fori_loop(
        0, steps, alternate, (current, best, held_losses)
    )
    return u, v, new_bias, value, jnp.sum(y**2), held_losses
