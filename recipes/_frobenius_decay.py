"""Frobenius decay (Khodak et al. 2021): weight decay on the product u @ v, not on u and v.

Plain L2 decay on the factors penalizes ‖u‖² + ‖v‖², which depends on how the product
is split between them and pulls a factorized layer towards a different solution than
its dense twin. Frobenius decay penalizes the layer's weight itself, λ/2·‖u v‖²_F, whose
gradients are λ·(u v) vᵀ and λ·uᵀ(u v); both cost O(r²(m + n)) through r×r Grams.
"""

import equinox as eqx
import jax
import optax
from jaxtyping import Array, Float, PyTree

import lowrank

_FACTORIZED = (lowrank.LowRankLinear, lowrank.LowRankConv)


def _is_factorized(x) -> bool:
    return isinstance(x, _FACTORIZED)


def frobenius_decay_grads(
    u: Float[Array, "out r"], v: Float[Array, "r *fan_in"], weight_decay: float
) -> tuple[Float[Array, "out r"], Float[Array, "r *fan_in"]]:
    """The gradients of λ/2·‖u v‖²_F with respect to u and v (v may carry kernel axes)."""
    flat = v.reshape(v.shape[0], -1)
    grad_u = weight_decay * u @ (flat @ flat.T)
    grad_v = weight_decay * (u.T @ u) @ flat
    return grad_u, grad_v.reshape(v.shape)


def frobenius_decay(weight_decay: float) -> optax.GradientTransformation:
    """Add the gradient of λ/2·‖u v‖²_F to the updates of every `lowrank.LowRankLinear`
    and `lowrank.LowRankConv` in the parameters; every other parameter is left alone.
    Stateless; needs `params` in `update`."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("frobenius_decay needs params: call update(grads, state, params).")

        def add(update, param):
            if not _is_factorized(update):
                return update
            grad_u, grad_v = frobenius_decay_grads(param.u, param.v, weight_decay)
            u, v = (
                update.u + grad_u.astype(update.u.dtype),
                update.v + grad_v.astype(update.v.dtype),
            )
            return eqx.tree_at(lambda layer: (layer.u, layer.v), update, (u, v))

        return jax.tree.map(add, updates, params, is_leaf=_is_factorized), state

    return optax.GradientTransformation(init_fn, update_fn)


def not_factors(params: PyTree) -> PyTree[bool]:
    """A mask that is False on the u and v of factorized layers and True elsewhere: plain
    weight decay under it leaves the factors to `frobenius_decay`."""

    def mask(leaf):
        flags = jax.tree.map(lambda _: True, leaf)
        if _is_factorized(leaf):
            flags = eqx.tree_at(lambda layer: (layer.u, layer.v), flags, (False, False))
        return flags

    return jax.tree.map(mask, params, is_leaf=_is_factorized)
