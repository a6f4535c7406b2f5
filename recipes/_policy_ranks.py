"""The rank rules `factorize.rank` names: `lowrank`'s own, "params:f" / "flops:f" global
budgets, and the stable rank rules "stable" and "stable:scaled" (Cuttlefish)."""

import math
import re

import equinox as eqx
import numpy as np
from jaxtyping import PyTree

import lowrank

from .config import ConfigError

STABLE_RULES = ("stable", "stable:scaled")
RANK_FORMS = (
    "an int (16), a fraction of full rank (0.25), 'energy:0.9' (the rank keeping that "
    "share of the spectral energy), 'params:0.3' or 'flops:0.3' (a global budget), "
    "'stable' or 'stable:scaled'"
)
"""Every form `factorize.rank` takes, for error messages."""


def stable_rank(weight) -> float:
    """‖W‖²_F / ‖W‖²_2 of a weight seen as an (out, fan_in) matrix: a smooth lower
    bound on its rank that ignores small singular values."""
    w = np.asarray(weight, np.float64).reshape(weight.shape[0], -1)
    s = np.linalg.svd(w, compute_uv=False)
    return float(np.sum(s**2) / max(s[0] ** 2, 1e-300))


def target_layers(model: PyTree, pattern: str) -> dict[str, eqx.Module]:
    """The Linear/Conv layers of `model` whose dotted path fullmatches `pattern`, read
    from the model index (`lowrank.select`); raises if the pattern matches no layer.

    Args:
        model: the model.
        pattern: the regex.

    Returns:
        {path: layer}.
    """
    index = lowrank.select(model, target=pattern)
    return {
        p: e.layer for p, e in index.items() if isinstance(e.layer, (eqx.nn.Linear, eqx.nn.Conv))
    }


def stable_ranks(model: PyTree, pattern: str, initial: PyTree | None = None) -> dict[str, int]:
    """Per selected layer, ceil of its stable rank; with `initial` (the same model at
    initialization) scaled by full rank / initial stable rank, capped at full rank."""
    layers = target_layers(model, pattern)
    start = target_layers(initial, pattern) if initial is not None else {}
    ranks = {}
    for path, layer in layers.items():
        full = min(layer.weight.shape[0], math.prod(layer.weight.shape[1:]))
        estimate = stable_rank(layer.weight)
        if initial is not None:
            estimate *= full / stable_rank(start[path].weight)
        ranks[path] = min(full, max(1, math.ceil(estimate - 1e-9)))
    return ranks


def _rank_rule(rank: int | float | str, model: PyTree = None, pattern: str = "", initial=None):
    """The `lowrank` rank rule for `factorize.rank` (stable rules need the model)."""
    if isinstance(rank, str) and rank.split(":")[0] in ("params", "flops"):
        kind, _, fraction = rank.partition(":")
        try:
            return lowrank.Budget(**{kind: float(fraction)})
        except ValueError as e:
            raise ConfigError(f"factorize.rank={rank!r}: {e}") from e
    if rank in STABLE_RULES:
        ranks = stable_ranks(model, pattern, initial if rank == "stable:scaled" else None)
        return {re.escape(path): r for path, r in ranks.items()}
    return rank


def check_rank_text(rank: str) -> None:
    """Raise a `ConfigError` listing every accepted form unless `rank` is one.

    Args:
        rank: the text of `factorize.rank`.
    """
    kind, colon, value = rank.partition(":")
    if rank in STABLE_RULES:
        return
    if kind == "stable":
        raise ConfigError(
            f"factorize.rank={rank!r} is not a stable rank rule; use 'stable' or 'stable:scaled'."
        )
    if colon and kind in ("energy", "params", "flops"):
        try:
            float(value)
            return
        except ValueError:
            pass
    raise ConfigError(f"factorize.rank={rank!r} is not a rank rule; use {RANK_FORMS}.")
