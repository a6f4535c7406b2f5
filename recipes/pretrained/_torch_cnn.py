"""Filling an Equinox CNN (ConvBNAct layers, a Linear classifier) from a torch state dict.

The model is traced abstractly (`eqx.filter_eval_shape`: no weights, no compiles), and
every one of its arrays is then taken from the checkpoint by name, BatchNorm running
statistics included, so no layer can keep a random init unnoticed and no checkpoint
tensor goes unread.
"""

from collections.abc import Callable, Iterable

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


def _is_state(leaf_path: str) -> bool:
    return ".batch_state_index." in leaf_path or ".batch_counter." in leaf_path


def load_cnn(
    make_model: Callable[[], PyTree],
    names: dict[str, str | np.ndarray],
    tensors: dict[str, np.ndarray],
    *,
    full_names: Iterable[str | np.ndarray],
    file: str,
    model_name: str,
    dtype,
) -> tuple[PyTree, eqx.nn.State]:
    """`make_model()` with every array taken from `tensors` by `names` (leaf path ->
    checkpoint name, or a value), and its state.

    Weights are cast to `dtype`; BatchNorm statistics stay float32. A checkpoint
    tensor that no leaf reads is an error unless the whole network (`full_names`, the
    values of `names` for an unsliced model) reads it, or it is a BatchNorm batch
    counter.
    """
    abstract = eqx.filter_eval_shape(make_model)
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
    known = {n for n in full_names if isinstance(n, str)}
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
