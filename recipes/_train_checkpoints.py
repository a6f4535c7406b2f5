"""The trainer's orbax checkpoints: (model, state, opt_state) arrays plus JSON metadata
that lists the arrays, so that resuming another run's checkpoint says what differs.
`ts` is a `recipes.train.TrainState`."""

from pathlib import Path
from typing import Any

import equinox as eqx
import jax
from jax.sharding import NamedSharding

from .config import ConfigError

_PARTS = ("model", "state", "opt_state")


def _array_signature(ts) -> list[list[str]]:
    """[path, "dtype[shape]"] of every array a checkpoint of `ts` holds, in order."""
    arrays = eqx.filter((ts.model, ts.state, ts.opt_state), eqx.is_array)
    return [
        [_PARTS[path[0].idx] + jax.tree_util.keystr(path[1:]), f"{x.dtype}{list(x.shape)}"]
        for path, x in jax.tree_util.tree_leaves_with_path(arrays)
    ]


def _signature_mismatch(saved: list[list[str]], here: list[list[str]]) -> str | None:
    """How the arrays of a checkpoint differ from those of this run, or None."""
    for (saved_path, saved_type), (path, kind) in zip(saved, here):
        if (saved_path, saved_type) != (path, kind):
            return f"the checkpoint has {saved_path} {saved_type} where this run has {path} {kind}"
    if len(saved) != len(here):
        return f"the checkpoint holds {len(saved)} arrays, this run {len(here)}"
    return None


class Checkpoints:
    """orbax checkpoints of (model, state, opt_state) arrays plus JSON metadata (which
    also lists the arrays, so resuming another model's checkpoint says what differs)."""

    def __init__(self, directory: Path, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            directory.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=max(1, keep))
        )

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, ts, meta: dict[str, Any]) -> None:
        leaves = jax.tree.leaves(eqx.filter((ts.model, ts.state, ts.opt_state), eqx.is_array))
        meta = {**meta, "arrays": _array_signature(ts)}
        args = self._ocp.args
        self.manager.save(
            ts.step, args=args.Composite(arrays=args.StandardSave(leaves), meta=args.JsonSave(meta))
        )

    def mismatch(self, step: int, why: str) -> ConfigError:
        """The error for a checkpoint at `step` that is not this run's, saying `why`."""
        return ConfigError(
            f"train.out_dir holds a checkpoint of another run: at step {step} in "
            f"{self.manager.directory}, {why}; set train.out_dir to a fresh folder, or "
            "train.resume=false to train from scratch there."
        )

    def meta(self, step: int) -> dict[str, Any]:
        args = self._ocp.args
        return self.manager.restore(step, args=args.Composite(meta=args.JsonRestore()))["meta"]

    def restore(self, ts, sharding: NamedSharding, meta: dict[str, Any]):
        """`ts` with the arrays of the checkpoint at `ts.step` (whose metadata is `meta`);
        a `ConfigError` if they are not this run's arrays."""
        saved = meta.get("arrays")
        why = None if saved is None else _signature_mismatch(saved, _array_signature(ts))
        if why is not None:
            raise self.mismatch(ts.step, why)
        arrays, static = eqx.partition((ts.model, ts.state, ts.opt_state), eqx.is_array)
        leaves, treedef = jax.tree.flatten(arrays)
        target = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) for x in leaves]
        args = self._ocp.args
        try:
            restored = self.manager.restore(
                ts.step, args=args.Composite(arrays=args.StandardRestore(target))
            )["arrays"]
        except Exception as e:  # a checkpoint written before the array list was kept
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise self.mismatch(ts.step, f"its arrays do not fit this run ({first_line})") from e
        model, state, opt_state = eqx.combine(jax.tree.unflatten(treedef, restored), static)
        return ts._replace(model=model, state=state, opt_state=opt_state)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
