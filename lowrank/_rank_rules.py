"""Rank rules: what `rank=` may be (int, fraction, 'energy:x', {pattern: rule}), checked,
and the rank each rule gives a layer. A `Budget` is the other kind of rule (`_budget`)."""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ._cost import fits
from ._initializers import singular_values
from ._select import check_keys, matches_key, skip_reason, weight_matrix


def python_number(x):
    """A NumPy/JAX scalar (np.int64(4), np.float32(0.5), jnp.array(4)) as the Python
    int or float it holds; anything else (bools included) passes through unchanged."""
    if isinstance(x, (np.ndarray, np.generic, jax.Array)) and np.ndim(x) == 0:
        value = np.asarray(x)
        if np.issubdtype(value.dtype, np.integer):
            return int(value)
        if np.issubdtype(value.dtype, np.floating):
            return float(value)
    return x


def python_rule(rank):
    """The rank rule with NumPy/JAX scalars (also dict values) as Python numbers."""
    if isinstance(rank, Mapping):
        return {key: python_number(value) for key, value in rank.items()}
    return python_number(rank)


def validate_rank_rule(rank, where: str = "rank") -> None:
    """Raise a TypeError/ValueError naming `where` unless `rank` is a valid non-Budget rule."""
    if isinstance(rank, bool):
        raise TypeError(f"{where} must be an int, float, 'energy:x', dict or Budget, got {rank!r}")
    if isinstance(rank, int):
        if rank <= 0:
            raise ValueError(f"{where}={rank} must be a positive int (e.g. rank=8)")
    elif isinstance(rank, float):
        if not 0 < rank <= 1:
            raise ValueError(
                f"{where}={rank} is a fraction of full rank and must lie in (0, 1], e.g. 0.25"
            )
    elif isinstance(rank, str):
        energy_fraction(rank, where)
    elif isinstance(rank, Mapping):
        if not rank and where == "rank":
            raise ValueError(
                "rank={} has no rules: give {pattern: rank} entries, e.g. "
                "rank={'attn': 0.5}, or one rank for every layer, e.g. rank=0.5"
            )
        check_keys(rank, "rank")
        for pattern, value in rank.items():
            if not isinstance(value, (int, float, str)):
                raise TypeError(f"{where}[{pattern!r}] must be an int, float or 'energy:x'")
            validate_rank_rule(value, f"{where}[{pattern!r}]")
    else:
        raise TypeError(
            f"{where} must be an int, a float in (0, 1], 'energy:x', a dict {{pattern: rank}} "
            f"or lowrank.Budget(...), got {type(rank).__name__}"
        )


def energy_fraction(rule: str, where: str) -> float:
    """The x of an 'energy:x' rule; raises naming `where` if the string is malformed."""
    prefix = "energy:"
    try:
        if not rule.startswith(prefix):
            raise ValueError
        value = float(rule[len(prefix) :])
    except ValueError:
        raise ValueError(f"{where}={rule!r}: string ranks look like 'energy:0.9'") from None
    if not 0 < value <= 1:
        raise ValueError(f"{where}={rule!r}: the energy fraction must lie in (0, 1]")
    return value


def rank_from_rule(rule, spectrum: np.ndarray, path: str, matrix_shape, explicit: bool) -> int:
    """The rank an int / fraction / 'energy:x' rule gives a layer of this spectrum.

    An int above full rank raises when the user named the layer (`explicit`: by target
    or dict rule); otherwise the planner keeps such a layer dense with its reason.
    """
    m, n = matrix_shape
    if isinstance(rule, int):
        if rule > min(m, n) and explicit:
            raise ValueError(
                f"rank {rule} > min({m}, {n}) for {path}; choose rank <= {min(m, n)} "
                "or drop the layer from target"
            )
        return rule
    if isinstance(rule, float):
        return max(1, round(rule * min(m, n)))
    energy = np.cumsum(spectrum**2) / max(float(np.sum(spectrum**2)), 1e-30)
    return int(np.searchsorted(energy, energy_fraction(rule, "rank") - 1e-12) + 1)


def dict_rule(rank: Mapping, path: str):
    """The first rule of a {pattern: rule} dict whose key matches `path`, or None."""
    for pattern, value in rank.items():
        if matches_key(pattern, path):
            return value
    return None


def check_dict_patterns(rank: Mapping, paths: list[str]) -> None:
    """Raise unless every key of a {pattern: rule} dict matches a selected layer."""
    for pattern in rank:
        if not any(matches_key(pattern, p) for p in paths):
            raise ValueError(
                f"rank pattern {pattern!r} matches no selected layer; selected layers: "
                f"{paths[:8]}{' ...' if len(paths) > 8 else ''}"
            )


def check_rank_value(path: str, matrix_shape: tuple[int, int], rank) -> None:
    """Raise unless `rank` is a positive int at most full rank and short of break-even."""
    m, n = matrix_shape
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank for {path} must be a positive int or None, got {rank!r}")
    if rank > min(m, n):
        raise ValueError(f"rank {rank} > min({m}, {n}) for {path}; choose rank <= {min(m, n)}")
    if not fits(m, n, rank):
        raise ValueError(
            f"rank {rank} for {path} is past break-even ({rank * (m + n)} >= {m * n} dense "
            f"params); choose rank < {m * n / (m + n):.1f} or keep the layer dense (None)"
        )


def check_rank_fits(path: str, layer, rank) -> None:
    """Raise unless `layer` can be factorized at `rank` (for plans edited by hand)."""
    reason = skip_reason(layer)
    if reason is not None:
        raise ValueError(f"layer {path} cannot be factorized: {reason}")
    check_weight(path, layer.weight)
    check_rank_value(path, tuple(weight_matrix(layer).shape[-2:]), rank)


def check_weight(path: str, weight) -> None:
    """Raise unless a layer's weight is finite floating point (what factorizing needs)."""
    if not jnp.issubdtype(weight.dtype, jnp.inexact):
        raise ValueError(
            f"layer {path} has {weight.dtype} weights; low-rank factors need floating-point "
            f"weights: cast the model to float (e.g. float32) or exclude=[{path!r}]"
        )
    if not np.isfinite(np.asarray(weight)).all():
        raise ValueError(
            f"layer {path} has non-finite weights (NaN/inf); fix or re-initialize "
            "the dense model before factorizing"
        )


def spectrum(layer) -> np.ndarray:
    """Singular values of the layer's weight matrix, on the host (no per-shape compile).

    A stacked layer gets its slices' combined spectrum: entry i is the root of the sum
    over slices of each slice's i-th squared singular value, so that energy, weight
    error and budget retention at rank r are those of the whole stack, every slice at r.
    """
    w = np.asarray(weight_matrix(layer))
    mats = w.reshape(-1, *w.shape[-2:])
    return np.sqrt(sum(singular_values(m) ** 2 for m in mats))
