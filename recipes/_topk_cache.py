"""A teacher's logits cached on disk as their top k per token."""

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int


def save_topk_logits(path, logits: Float[ArrayLike, "... vocab"], *, k: int) -> None:
    """Save the k largest logits per token and their token ids to an .npz file.

    Args:
        path: the .npz file to write.
        logits: the teacher's logits.
        k: how many to keep per token.
    """
    logits = np.asarray(logits)
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be in [1, vocab={logits.shape[-1]}], got {k}")
    idx = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    values = np.take_along_axis(logits, idx, axis=-1)
    np.savez(
        path,
        values=values.astype(np.float32),
        indices=idx.astype(np.int32),
        vocab=np.int64(logits.shape[-1]),
    )


def load_topk_logits(path) -> tuple[Float[np.ndarray, "... k"], Int[np.ndarray, "... k"], int]:
    """(values, indices, vocab) as written by `save_topk_logits`.

    Args:
        path: a file written by `save_topk_logits`.

    Returns:
        (values, indices, vocab).
    """
    with np.load(path) as f:
        return f["values"], f["indices"], int(f["vocab"])


def topk_to_logits(
    values: Float[ArrayLike, "... k"], indices: Int[ArrayLike, "... k"], vocab: int
) -> Float[Array, "... vocab"]:
    """Dense logits from a top-k cache: kept entries as saved, the rest -inf, so the
    teacher distribution is the softmax renormalized over its top k tokens.

    Args:
        values: the kept logits.
        indices: their token ids.
        vocab: the vocabulary size.

    Returns:
        (..., vocab) logits.
    """
    values = jnp.asarray(values)
    dense = jnp.full((*values.shape[:-1], vocab), -jnp.inf, values.dtype)
    return jnp.put_along_axis(dense, jnp.asarray(indices), values, axis=-1, inplace=False)
