"""Save a factorized model and load it back: Equinox leaves plus the plan as JSON.

`save("dir/model", ...)` and `save("dir/model.eqx", ...)` both write `dir/model.eqx`
(the leaves, as `eqx.tree_serialise_leaves` writes them) and `dir/model.plan.json`
(the plan, with the size and SHA-256 of the weights file and the shape and dtype of
every leaf); `load` takes either name too. The plan says which layers are factorized
at which rank and which carry a fused epilogue, so `load` rebuilds the factorized
skeleton from a freshly constructed dense model and fills in the leaves. Both files
are first written to temporary files next to the targets and then renamed over them,
so a failed save leaves the previous one intact; the checksum makes `load` refuse a
pair from two different saves (a save interrupted between the two renames), a
truncated or edited weights file, and the manifest a dense model that does not fit.
Kernel settings (`with_kernels`) are not saved: loaded layers use the defaults.
"""

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._conv import LowRankConv
from ._factorize import factorize
from ._initializers import Factors, Initializer, LayerProblem
from ._layers import LowRankLinear
from ._plan import Plan, plan_from_data
from ._select import key_path_to_str, walk_layers

SAVE_FORMAT = 1
_CHUNK = 1 << 20


def saved_paths(path) -> tuple[Path, Path]:
    """(weights file, plan file) for a save path given with or without `.eqx`."""
    path = Path(path)
    weights = path if path.suffix == ".eqx" else path.with_name(path.name + ".eqx")
    return weights, weights.with_suffix(".plan.json")


def save(path, model, plan: Plan) -> None:
    """Write `model`'s leaves to `<path>.eqx` and `plan` to `<path>.plan.json`, atomically.

    Args:
        path: the file name, with or without the `.eqx` suffix; missing parent
            directories are created.
        model: the factorized model.
        plan: the plan it was factorized with (`factorize(..., return_plan=True)`).

    Returns:
        None; both files are replaced together or not at all.
    """
    if not isinstance(plan, Plan):
        raise TypeError(
            "save needs the Plan the model was factorized with (factorize(..., return_plan=True))"
        )
    for p, layer in walk_layers(model):
        if getattr(layer, "inner_activation", None):
            raise ValueError(
                f"lowrank.save: layer {p} carries inner_activation={layer.inner_activation!r}, "
                "which the save format does not record; save the model without it"
            )
    in_model = _lowrank_layers(model)
    in_plan = {l.path: (l.rank, l.epilogue) for l in plan.factorized}
    if in_model != in_plan:
        raise ValueError(
            f"the plan does not describe this model: model has low-rank layers {in_model}, "
            f"plan lists {in_plan} (path: (rank, fused epilogue)); pass the plan "
            "factorize(..., return_plan=True) returned"
        )
    if Path(path).is_dir():
        raise IsADirectoryError(
            f"lowrank.save path {str(path)!r} is a directory; give a file name inside it, "
            f"e.g. {str(Path(path) / 'model')!r}"
        )
    weights, plan_file = saved_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    temps = []
    try:
        with _temp_file(weights, temps) as f:
            hashing = _HashingWriter(f)
            eqx.tree_serialise_leaves(hashing, model)
        record = {
            "lowrank_save": SAVE_FORMAT,
            "weights": {"file": weights.name, "bytes": hashing.size, "sha256": hashing.hexdigest()},
            "leaves": _manifest(model),
            "plan": json.loads(plan.to_json()),
        }
        with _temp_file(plan_file, temps) as f:
            f.write((json.dumps(record, indent=1) + "\n").encode())
        os.replace(temps[0], weights)
        os.replace(temps[1], plan_file)
    finally:
        for temp in temps:
            if os.path.exists(temp):
                os.remove(temp)


@contextlib.contextmanager
def _temp_file(target: Path, names: list):
    """A new file next to `target` (same file system, so os.replace is atomic), synced to
    disk when the block ends; its name is appended to `names` for the caller to clean up."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    names.append(name)
    with os.fdopen(fd, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


class _HashingWriter:
    """A write-only file that counts and hashes what passes through it."""

    def __init__(self, file):
        self.file, self.size, self._hash = file, 0, hashlib.sha256()

    def write(self, data) -> int:
        self._hash.update(data)
        self.size += memoryview(data).nbytes
        return self.file.write(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _lowrank_layers(model) -> dict[str, tuple[int, str | None]]:
    """{path: (rank, fused epilogue activation or None)} of the model's low-rank layers."""
    return {
        p: (layer.rank, getattr(layer, "activation", None))
        for p, layer in walk_layers(model)
        if isinstance(layer, (LowRankLinear, LowRankConv))
    }


def _manifest(model) -> dict[str, str]:
    """{path: "dtype[shape]"} of every leaf `eqx.tree_serialise_leaves` writes, in order."""
    rows = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(model)[0]:
        if eqx.is_array_like(leaf):
            dtype = leaf.dtype.name if hasattr(leaf, "dtype") else type(leaf).__name__
            rows[key_path_to_str(key_path)] = f"{dtype}[{','.join(map(str, np.shape(leaf)))}]"
    return rows


class _Skeleton(Initializer):
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
    """Rebuild the model that `lowrank.save` wrote at `path`.

    Args:
        path: the name given to `save` (with or without `.eqx`).
        dense_model: a dense model from the same constructor (same arguments; its
            weights do not matter), to rebuild the factorized skeleton from.

    Returns:
        The saved factorized model. Raises a ValueError naming the file and the fix
        when a file is corrupted, edited, from another save, or does not fit
        `dense_model`.
    """
    weights, plan_file = saved_paths(path)
    if not weights.is_file() or not plan_file.is_file():
        raise FileNotFoundError(f"need both {weights} and {plan_file} (written by lowrank.save)")
    record = _read_record(plan_file)
    resave = "restore it from a backup or save the model again with lowrank.save"
    try:
        plan = plan_from_data(record["plan"])
    except ValueError as e:
        raise ValueError(f"{plan_file} holds a broken plan: {e}; {resave}") from None
    _check_weights_file(weights, plan_file, record["weights"])
    fuse = any(l.epilogue for l in plan.layers)
    try:
        skeleton = (
            factorize(dense_model, plan=plan, init=_Skeleton(), fuse_activations=fuse)
            if plan.factorized
            else dense_model
        )
        _check_epilogues(skeleton, plan)
    except ValueError as e:
        raise ValueError(
            f"the plan in {plan_file} does not fit dense_model: {e}. Build dense_model with "
            "the constructor and arguments of the saved model"
        ) from None
    _check_manifest(record["leaves"], _manifest(skeleton), weights, plan_file)
    with open(weights, "rb") as f:
        return eqx.tree_deserialise_leaves(f, skeleton)


def _check_epilogues(skeleton, plan: Plan) -> None:
    """Raise unless the skeleton's fused epilogues are those the plan records."""
    built = {p: act for p, (_, act) in _lowrank_layers(skeleton).items()}
    saved = {l.path: l.epilogue for l in plan.factorized}
    if built != saved:
        raise ValueError(
            f"the saved layers have the fused epilogues {saved}, but factorizing dense_model "
            f"fuses {built} (are its activations those of the saved model?)"
        )


def _read_record(plan_file: Path) -> dict:
    broken = f"{plan_file} is not a lowrank.save plan file"
    fix = "restore it from a backup or save the model again with lowrank.save"
    try:
        record = json.loads(plan_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{broken}: it is not valid JSON ({e}), so it is truncated or corrupted; {fix}"
        ) from None
    keys = {"lowrank_save", "weights", "leaves", "plan"}
    if not isinstance(record, dict) or set(record) != keys or record["lowrank_save"] != SAVE_FORMAT:
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{broken} (format {SAVE_FORMAT}, keys {sorted(keys)}; got {got}); {fix}")
    info, leaves = record["weights"], record["leaves"]
    if not (
        isinstance(info, dict)
        and isinstance(info.get("bytes"), int)
        and isinstance(info.get("sha256"), str)
        and isinstance(leaves, dict)
    ):
        raise ValueError(f"{broken}: its 'weights' or 'leaves' entry was edited; {fix}")
    return record


def _check_weights_file(weights: Path, plan_file: Path, info: dict) -> None:
    size, digest = 0, hashlib.sha256()
    with open(weights, "rb") as f:
        while chunk := f.read(_CHUNK):
            size += len(chunk)
            digest.update(chunk)
    if size != info["bytes"] or digest.hexdigest() != info["sha256"]:
        what = (
            "shorter (truncated?)"
            if size < info["bytes"]
            else "longer"
            if size > info["bytes"]
            else "changed"
        )
        raise ValueError(
            f"{weights} does not match {plan_file}: it has {size} bytes where the save wrote "
            f"{info['bytes']} ({what}; SHA-256 differs), so it is corrupted, edited, or from "
            "another save (e.g. one interrupted between writing the two files). Save the "
            "model again with lowrank.save, or restore both files from the same save"
        )


def _check_manifest(saved: dict, expected: dict, weights: Path, plan_file: Path) -> None:
    """Compare the leaves the save wrote with those of the skeleton built from dense_model."""
    if list(saved.items()) == list(expected.items()):
        return
    problems = [
        f"{path} is {saved[path]} in the file but {kind} in the model"
        if path in saved
        else f"{path} ({kind}) is in the model but not in the file"
        for path, kind in expected.items()
        if saved.get(path) != kind
    ]
    problems += [
        f"{path} is in the file but not in the model" for path in saved if path not in expected
    ]
    problems = problems or ["the leaves come in another order"]
    raise ValueError(
        f"{weights} does not fit the model rebuilt from dense_model and {plan_file}: "
        f"{'; '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}. Build dense_model "
        "with the constructor, arguments (widths, use_bias, ...) and dtype of the saved model; "
        "if the plan file was edited, restore it"
    )
