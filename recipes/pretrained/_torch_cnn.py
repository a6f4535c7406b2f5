"""Filling an Equinox CNN (ConvBNAct layers, a Linear classifier) from a torch state dict.

The model is traced abstractly (`eqx.filter_eval_shape`: no weights, no compiles), and
every one of its arrays is then taken from the checkpoint by name, BatchNorm running
statistics included, so no layer can keep a random init unnoticed and no checkpoint
tensor goes unread.
"""

from collections.abc import Callable, Sequence
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

# eqx.nn.BatchNorm(mode="batch") divides its running statistics by 1 - momentum**count
# (a debiasing for statistics that started at zero). Pretrained statistics are settled:
# at this count momentum**count is 0 in float32, so they are used as they are, and
# training updates them exactly as PyTorch's BatchNorm does.
_SETTLED_COUNT = 1 << 16


def conv_bn_names(path: str, conv: str, bn: str) -> dict[str, str | np.ndarray]:
    """{leaf path: checkpoint name} for the ConvBNAct at `path`, whose conv is the
    checkpoint's `conv` and whose BatchNorm is `bn`."""
    return {
        f"{path}.conv.weight": f"{conv}.weight",
        f"{path}.bn.weight": f"{bn}.weight",
        f"{path}.bn.bias": f"{bn}.bias",
        f"{path}.bn.batch_state_index.init.0": f"{bn}.running_mean",
        f"{path}.bn.batch_state_index.init.1": f"{bn}.running_var",
        f"{path}.bn.batch_counter.init": np.asarray(_SETTLED_COUNT, np.int32),
    }


def inverted_residual_names(
    table: Sequence[tuple[int, ...]],
    blocks_per_stage: int | None,
    block_parts: Callable[[int, int], list[tuple[str, str, str]]],
    *,
    first: int,
) -> dict[str, str | np.ndarray]:
    """{leaf path: checkpoint name} for the blocks an `InvertedResidualNet` built from
    stage `table` keeps at `blocks_per_stage`.

    Args:
        table: the stage rows (expand ratio, ..., blocks).
        blocks_per_stage: None for every block, or k for the first k of each stage.
        block_parts: (checkpoint block index, expand ratio) -> [(part, conv name, BatchNorm
            name)] for the block's ConvBNAct parts ("expand", "depthwise", "project").
        first: the checkpoint's index of the first block (later ones count up from it,
            dropped blocks included).

    Returns:
        The map for the blocks' ConvBNAct leaves.
    """
    names = {}
    index = first
    for s, (ratio, *_, n) in enumerate(table):
        for j in range(n):
            if blocks_per_stage is None or j < blocks_per_stage:
                for part, conv, bn in block_parts(index, ratio):
                    names.update(conv_bn_names(f"stages.{s}.blocks.{j}.{part}", conv, bn))
            index += 1
    return names


def _is_state(leaf_path: str) -> bool:
    return ".batch_state_index." in leaf_path or ".batch_counter." in leaf_path


def load_cnn(
    model_class: Callable[..., PyTree],
    names_at: Callable[[int | None], dict[str, str | np.ndarray]],
    tensors: dict[str, np.ndarray],
    *,
    blocks_per_stage: int | None,
    path: Path,
    model_name: str,
    dtype,
) -> tuple[PyTree, eqx.nn.State]:
    """`model_class(blocks_per_stage=...)` with every array taken from `tensors` by
    `names_at(blocks_per_stage)` (leaf path -> checkpoint name, or a value), and its
    state.

    Weights are cast to `dtype`; BatchNorm statistics stay float32. A checkpoint
    tensor that no leaf reads is an error unless the whole network (the values of
    `names_at(None)`) reads it, or it is a BatchNorm batch counter.

    Args:
        model_class: the model's class, built with `blocks_per_stage` and a key.
        names_at: blocks_per_stage -> the leaf-path-to-checkpoint map of that slice.
        tensors: the checkpoint's tensors by name.
        blocks_per_stage: the slice to load (None: the whole network).
        path: the checkpoint file, named in errors.
        model_name: the model, named in errors.
        dtype: the dtype of the weights.

    Returns:
        (model, state).
    """
    names, file = names_at(blocks_per_stage), str(path)
    abstract = eqx.filter_eval_shape(
        lambda: model_class(blocks_per_stage=blocks_per_stage, key=jax.random.key(0))
    )
    leaves = {
        jax.tree_util.keystr(p, simple=True, separator="."): leaf
        for p, leaf in jax.tree_util.tree_leaves_with_path(abstract)
        if isinstance(leaf, jax.ShapeDtypeStruct)
    }
    if set(leaves) != set(names):
        raise RuntimeError(
            f"{model_name}'s checkpoint map does not match the model: unmapped "
            f"{sorted(set(leaves) - set(names))[:5]}, unknown {sorted(set(names) - set(leaves))[:5]}."
        )
    fix = f"the file is not a {model_name} checkpoint (reinstall its package)."
    missing = sorted(n for n in names.values() if isinstance(n, str) and n not in tensors)
    if missing:
        raise ValueError(f"{file}: has no tensor {missing[0]!r} ({len(missing)} missing); {fix}")
    known = {n for n in names_at(None).values() if isinstance(n, str)}
    unused = {n for n in tensors if n not in known and not n.endswith(".num_batches_tracked")}
    if unused:
        raise ValueError(
            f"{file}: has tensors {model_name} does not use, e.g. {min(unused)!r} "
            f"({len(unused)} of them); {fix}"
        )

    def fill(p, leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        path = jax.tree_util.keystr(p, simple=True, separator=".")
        source = names[path]
        value = tensors[source] if isinstance(source, str) else source
        if value.shape != leaf.shape:
            raise ValueError(
                f"{file}: tensor {source!r} has shape {value.shape}, but {model_name}'s "
                f"{path} needs {leaf.shape}; {fix}"
            )
        return jnp.asarray(value, leaf.dtype if _is_state(path) else dtype)

    model = jax.tree_util.tree_map_with_path(fill, abstract)
    return eqx.nn.make_with_state(lambda: model)()
