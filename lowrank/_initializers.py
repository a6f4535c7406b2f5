"""Initializers: map one dense layer's weight to low-rank factors u @ v.

An initializer sees a `LayerProblem` (the dense weight as an (out, in) matrix, its
bias, the target rank, the activation that follows it if known, and the inputs the
layer saw on calibration data, if any) and returns `Factors`. Initializers register
by name, so `factorize(init="nkp")` and `factorize(init=NKP(...))` both work.
"""

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import equinox as eqx
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

    Attributes:
        path: the layer's dotted path (`blocks.fc[3]` for a slice of a stack).
        weight: the dense weight matrix (m, n).
        bias: its bias (m,), or None.
        rank: the target rank r.
        activation: the function after the layer, or None when unknown.
        inputs: calibration inputs (N, n), or None.
        dense_inputs: the dense model's inputs on the same rows, or None.
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

    Attributes:
        u: the left factor (m, r).
        v: the right factor (r, n).
        bias: the bias the factorized layer uses (m,), or None.
        function_error: the relative error of the layer's function, if measured.
        assumes: what `function_error` rests on when not measured on data, or None.
    """

    u: Float[Array, "m r"]
    v: Float[Array, "r n"]
    bias: Float[Array, " m"] | None
    function_error: float | None = None
    assumes: str | None = None


CALIBRATION_MODES = ("never", "optional", "required")


class Initializer(eqx.Module):
    """The base of every initializer: maps one layer's `LayerProblem` to `Factors`.

    Subclasses declare `calibration` as a class attribute: "never" (calibration data
    is refused), "optional" (used when given) or "required"; factorize and the recipes
    read it. An initializer that assumes an activation after layers whose activation
    is unknown (`problem.activation` None) names it in a `fallback_activation`
    attribute (NKP: "ReLU"), so that `factorize` can warn about those layers.

    Attributes:
        calibration: "never", "optional" or "required" (a class attribute).

    Example:
        class Half(lowrank.Initializer):
            calibration = "never"

            def __call__(self, problem, *, key):
                u, v = ...  # (m, r) and (r, n)
                return lowrank.Factors(u, v, problem.bias)
    """

    calibration: eqx.AbstractClassVar[Literal["never", "optional", "required"]]

    @abc.abstractmethod
    def __call__(self, problem: LayerProblem, *, key: PRNGKeyArray) -> Factors:
        """Factors for one layer.

        Args:
            problem: the layer's weight matrix, bias, rank, activation and inputs.
            key: a PRNG key for this layer (slice).

        Returns:
            `Factors` u (m, r), v (r, n) and the bias to use.
        """


_REGISTRY: dict[str, Initializer] = {}


def register_initializer(name: str, initializer: Initializer) -> None:
    """Make `initializer` available as `factorize(init=name)`.

    Args:
        name: the name `factorize(init=...)` will take.
        initializer: an instance of a `lowrank.Initializer` subclass. Other callables
            with a `calibration` class attribute are still accepted (initializers
            written before the base existed).

    Returns:
        None; raises TypeError/ValueError if `initializer` is not one.
    """
    _check_initializer(initializer, f"initializer {name!r}")
    _REGISTRY[name] = initializer


def _check_initializer(init, what: str) -> None:
    if not isinstance(init, Initializer) and not (callable(init) and hasattr(init, "calibration")):
        raise TypeError(
            f"{what} must be callable as init(problem, *, key) and declare `calibration` "
            "('never', 'optional' or 'required'): subclass lowrank.Initializer, set "
            f"`calibration = ...` and define __call__; got {type(init).__name__}"
        )
    if init.calibration not in CALIBRATION_MODES:
        raise ValueError(
            f"{what} has calibration={init.calibration!r}; set it to one of {CALIBRATION_MODES}"
        )


def available_initializers() -> list[str]:
    """The registered initializer names.

    Returns:
        The names `factorize(init=...)` accepts, sorted.
    """
    return sorted(_REGISTRY)


def get_initializer(name: str) -> Initializer:
    """The initializer registered as `name`.

    Args:
        name: a registered name ("spectral", "random", "nkp", "whitened", ...).

    Returns:
        The initializer object, whose `calibration` says whether it needs data.
    """
    return resolve_initializer(name)


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
    if isinstance(init, Initializer) or (callable(init) and hasattr(init, "calibration")):
        _check_initializer(init, "init")
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


class Spectral(Initializer):
    """Truncated SVD of the dense weight (Khodak et al. 2021), sqrt(S) split to both sides.

    Takes no arguments; `Spectral()(problem, key=key)` returns the `Factors`.
    """

    calibration = "never"

    def __call__(self, problem: LayerProblem, *, key: PRNGKeyArray) -> Factors:
        del key
        u, v = truncated_svd_factors(problem.weight, problem.rank)
        return Factors(u, v, problem.bias)

    def __repr__(self):
        return "spectral"


class Random(Initializer):
    """Independent Gaussian factors with Var[(u @ v)_ij] equal to the dense weight's.

    For training from scratch: the product has the per-entry variance of whatever
    initializer produced the dense weight (measured from the weight itself), split
    evenly between the two factors. Takes no arguments; `Random()(problem, key=key)`
    returns the `Factors`.
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
