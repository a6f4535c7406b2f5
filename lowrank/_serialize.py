"""Save a factorized model and load it back: Equinox leaves plus the plan as JSON.

The plan says which layers are factorized at which rank, so `load` rebuilds the
factorized skeleton from a freshly constructed dense model and fills in the leaves.
Kernel settings (`with_kernels`) are not saved: loaded layers use the defaults.
"""

from pathlib import Path

import jax.numpy as jnp
import equinox as eqx

from ._factorize import factorize
from ._initializers import Factors, LayerProblem
from ._layers import LowRankConv, LowRankLinear
from ._plan import Plan
from ._select import walk_layers


def _plan_path(path: Path) -> Path:
    return path.with_name(path.name + ".plan.json")


def save(path, model, plan: Plan) -> None:
    """Write `model`'s leaves to `path` and `plan` to `path + '.plan.json'`."""
    if not isinstance(plan, Plan):
        raise TypeError("save needs the Plan the model was factorized with (factorize(..., return_plan=True))")
    in_model = {
        p: layer.rank for p, layer in walk_layers(model) if isinstance(layer, (LowRankLinear, LowRankConv))
    }
    in_plan = {l.path: l.rank for l in plan.factorized}
    if in_model != in_plan:
        raise ValueError(
            f"the plan does not describe this model: model has low-rank layers {in_model}, "
            f"plan lists {in_plan}; pass the plan factorize(..., return_plan=True) returned"
        )
    path = Path(path)
    eqx.tree_serialise_leaves(path, model)
    _plan_path(path).write_text(plan.to_json())


class _Skeleton:
    """Zero factors of the right shapes: placeholders that `load` overwrites at once."""

    calibration = "never"

    def __call__(self, problem: LayerProblem, *, key) -> Factors:
        m, n = problem.weight.shape
        r = problem.rank
        zeros = jnp.zeros((m, r), problem.weight.dtype), jnp.zeros((r, n), problem.weight.dtype)
        return Factors(*zeros, problem.bias)

    def __repr__(self):
        return "loaded"


def load(path, dense_model):
    """Rebuild the model saved at `path`, given a dense model from the same constructor."""
    path = Path(path)
    plan_file = _plan_path(path)
    if not path.exists() or not plan_file.exists():
        raise FileNotFoundError(f"need both {path} and {plan_file} (written by lowrank.save)")
    plan = Plan.from_json(plan_file.read_text())
    skeleton = factorize(dense_model, plan=plan, init=_Skeleton())
    return eqx.tree_deserialise_leaves(path, skeleton)
