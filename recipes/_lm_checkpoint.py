"""Saving and loading a (dense or factorized) byte-level `Transformer` with its skeleton."""

import json
from pathlib import Path

import equinox as eqx
import jax.random as jr

import lowrank

from ._student_build import transformer_kwargs
from .models import Transformer


def save_lm(path, model: Transformer, plan: lowrank.Plan | None = None) -> None:
    """Write `model` to `path` and its skeleton to `path + '.json'`; a factorized model
    also needs its plan (written by `lowrank.save` next to it).

    Args:
        path: the model file (its folder is made).
        model: the model to save.
        plan: the `lowrank.Plan` of a factorized model; None for a dense one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if plan is None:
        eqx.tree_serialise_leaves(path, model)
    else:
        lowrank.save(path, model, plan)
    meta = {"transformer": transformer_kwargs(model), "factorized": plan is not None}
    path.with_name(path.name + ".json").write_text(json.dumps(meta, indent=1) + "\n")


def load_lm(path) -> Transformer:
    """A model written by `save_lm`, in inference mode.

    Args:
        path: a file written by `save_lm`.

    Returns:
        The model, in inference mode.
    """
    path = Path(path)
    meta_file = path.with_name(path.name + ".json")
    if not path.is_file() or not meta_file.is_file():
        raise FileNotFoundError(
            f"no saved model at {str(path)!r} (needs it and {meta_file.name}); train one "
            "first, e.g. python -m recipes.student shakespeare_teacher"
        )
    meta = json.loads(meta_file.read_text())
    skeleton = Transformer(**meta["transformer"], key=jr.key(0))
    if meta["factorized"]:
        model = lowrank.load(path, skeleton)
    else:
        model = eqx.tree_deserialise_leaves(path, skeleton)
    return eqx.nn.inference_mode(model)
