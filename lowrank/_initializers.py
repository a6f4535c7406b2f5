"""Initializers: map one dense layer's weight to low-rank factors u @ v.

An initializer sees a `LayerProblem` (the dense weight as an (out, in) matrix, its
bias, the target rank, the activation that follows it if known, and the inputs the
layer saw on calibration data, if any) and returns `Factors`. Initializers register
by name, so `factorize(init="nkp")` and `factorize(init=NKP(...))` both work.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray


@dataclass(frozen=True)
class LayerProblem:
    """Everything an initializer may use about one layer.

    `weight` is the dense weight as a matrix: (out, in) for Linear, and
    (out, in/groups * prod(kernel)) for Conv, so that a conv is the matmul of this
    matrix with image patches. `inputs` holds calibration inputs in the same matrix
    space (Linear: the layer's input vectors; Conv: flattened patches), or None.
    With sequential calibration, `inputs` come from the model whose earlier layers are
    already factorized, and `dense_inputs` holds what the dense model fed this layer on
    the same rows: the factors should map `inputs` to the dense layer's outputs on
    `dense_inputs`. None when the two are the same.
    """

    path: str
    weight: Float[Array, "m n"]
    bias: Float[Array, " m"] | None
    rank: int
    activation: Callable[[Array], Array] | None = None
    inputs: Float[Array, "N n"] | None = None
    dense_inputs: Float[Array, "N n"] | None = None


class Factors(NamedTuple):
    """W ~= u @ v, plus the bias to use and (optionally) a function-space error.

    `assumes` says what `function_error` rests on when it is not measured on the
    layer's real inputs and activation (e.g. "inputs x ~ N(0, I)"); plans show it.
    """

    u: Float[Array, "m r"]
    v: Float[Array, "r n"]
    bias: Float[Array, " m"] | None
    function_error: float | None = None
    assumes: str | None = None


class Initializer(Protocol):
    """What `factorize` calls. `calibration` says whether it uses calibration inputs.

    An initializer that assumes an activation after layers whose activation is
    unknown (`problem.activation` None) names it in an optional `fallback_activation`
    attribute (NKP: "ReLU"), so that `factorize` can warn about those layers.
    """

    calibration: Literal["never", "optional", "required"]

    def __call__(self, problem: LayerProblem, *, key: PRNGKeyArray) -> Factors: ...


_REGISTRY: dict[str, Initializer] = {}


def register_initializer(name: str, initializer: Initializer) -> None:
    """Make `initializer` available as `factorize(init=name)`."""
    if not callable(initializer) or not hasattr(initializer, "calibration"):
        raise TypeError(
            f"initializer {name!r} must be callable as init(problem, *, key) and "
            "have a `calibration` attribute ('never', 'optional' or 'required')"
        )
    _REGISTRY[name] = initializer


def available_initializers() -> list[str]:
    return sorted(_REGISTRY)


def resolve_initializer(init: "str | Initializer") -> Initializer:
    """Look up an initializer by name, or pass an initializer object through."""
    if isinstance(init, str):
        try:
            return _REGISTRY[init]
        except KeyError:
            raise ValueError(
                f"unknown init {init!r}; available: {', '.join(available_initializers())}. "
                "Register new ones with lowrank.register_initializer(name, fn)."
            ) from None
    if callable(init) and hasattr(init, "calibration"):
        return init
    raise TypeError(
        f"init must be a registered name or an initializer object, got {type(init).__name__}"
    )


def top_singular_triplets(weight, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-`rank` singular triplets (U (m, r), S (r,), Vt (r, n)) in float64, on the host.

    Eigen-decomposes the smaller Gram matrix (W Wᵀ or WᵀW) in float64: several times
    faster than a full SVD and free of XLA's per-shape compilation, and exact enough
    for the leading directions. Directions with a vanishing singular value get zero
    vectors, so rank-deficient weights give finite factors.
    """
    w = np.asarray(weight, np.float64)
    m, n = w.shape
    wide = m <= n
    eigvals, eigvecs = np.linalg.eigh(w @ w.T if wide else w.T @ w)
    order = np.argsort(eigvals)[::-1][:rank]
    s = np.sqrt(np.clip(eigvals[order], 0.0, None))
    basis = eigvecs[:, order]
    alive = s > 1e-12 * max(float(s.max(initial=0.0)), 1e-300)
    inv = np.where(alive, 1.0 / np.where(alive, s, 1.0), 0.0)
    if wide:
        return basis, s, (basis.T @ w) * inv[:, None]
    return (w @ basis) * inv, s, basis.T


def singular_values(weight) -> np.ndarray:
    """All singular values, descending, in float64 (from the smaller Gram matrix)."""
    w = np.asarray(weight, np.float64)
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None))


def truncated_svd_factors(
    weight: Float[Array, "m n"], rank: int
) -> tuple[Float[Array, "m r"], Float[Array, "r n"]]:
    """Best rank-r approximation in Frobenius norm, sqrt(S) split to both sides."""
    U, S, Vt = top_singular_triplets(weight, rank)
    root = np.sqrt(S)
    dtype = weight.dtype
    return jnp.asarray(U * root, dtype), jnp.asarray(root[:, None] * Vt, dtype)


class Spectral:
    """Truncated SVD of the dense weight (Khodak et al. 2021)."""

    calibration = "never"

    def __call__(self, problem: LayerProblem, *, key: PRNGKeyArray) -> Factors:
        del key
        u, v = truncated_svd_factors(problem.weight, problem.rank)
        return Factors(u, v, problem.bias)

    def __repr__(self):
        return "spectral"


class Random:
    """Independent Gaussian factors with Var[(u @ v)_ij] equal to the dense weight's.

    For training from scratch: the product has the per-entry variance of whatever
    initializer produced the dense weight (measured from the weight itself), split
    evenly between the two factors.
    """

    calibration = "never"

    def __call__(self, problem: LayerProblem, *, key: PRNGKeyArray) -> Factors:
        m, n = problem.weight.shape
        r = problem.rank
        variance = jnp.mean(jnp.square(problem.weight))
        scale = (variance / r) ** 0.25
        ukey, vkey = jax.random.split(key)
        dtype = problem.weight.dtype
        u = scale * jax.random.normal(ukey, (m, r), dtype)
        v = scale * jax.random.normal(vkey, (r, n), dtype)
        return Factors(u, v, problem.bias)

    def __repr__(self):
        return "random"


register_initializer("spectral", Spectral())
register_initializer("random", Random())
