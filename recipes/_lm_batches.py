"""Token-window batches for training and evaluating a byte-level language model."""

from collections.abc import Callable, Iterator

import numpy as np
from jaxtyping import Int

from .text import sample_windows

Batch = dict[str, np.ndarray]
"""A batch: "ids" (B, length + 1) token windows, optionally "alpha" or "mask" (B,)."""


def random_windows(
    data: np.ndarray, rng: np.random.Generator, batch_size: int, length: int
) -> Int[np.ndarray, "batch length_plus_1"]:
    """`text.sample_windows` drawn with a NumPy generator, arguments positional.

    Args:
        data: the token stream.
        rng: the NumPy generator that draws the starts.
        batch_size: how many windows.
        length: the input length (each window has one token more, the last target).

    Returns:
        (batch_size, length + 1) int32 windows.
    """
    return sample_windows(data, key=rng, batch_size=batch_size, length=length)


def train_batches(
    data: np.ndarray,
    *,
    batch_size: int,
    length: int,
    seed: int,
    alpha: Callable[[int], float] | None = None,
    hard: np.ndarray | None = None,
    hard_steps: int = 0,
) -> Callable[[int], Iterator[Batch]]:
    """`fn(step)` iterating over batches {"ids": (B, length + 1)} from global `step` on.

    Step s's batch depends only on (seed, s), so a resumed run sees the same batches.
    `alpha(step)` adds per-example KD weights {"alpha": (B,)}; for steps < `hard_steps`
    the windows are drawn from the rows of `hard` instead of the stream.

    Args:
        data: the token stream.
        batch_size: windows per batch.
        length: the input length.
        seed: the stream's seed.
        alpha: step -> KD weight, or None for no "alpha" entry.
        hard: windows to draw from before `hard_steps`, or None.
        hard_steps: the steps that draw from `hard`.

    Returns:
        The `train_data` callable of `recipes.train.train`.
    """

    def batches(step: int) -> Iterator[Batch]:
        while True:
            rng = np.random.default_rng([seed, 1, step])
            if hard is not None and step < hard_steps:
                ids = hard[rng.integers(0, len(hard), size=batch_size)]
            else:
                ids = random_windows(data, rng, batch_size, length)
            batch = {"ids": ids}
            if alpha is not None:
                batch["alpha"] = np.full((batch_size,), alpha(step), np.float32)
            yield batch
            step += 1

    return batches


def eval_batches(windows: np.ndarray, batch_size: int) -> Callable[[], Iterator[Batch]]:
    """One pass over `windows` in batches; the last is padded and masked.

    Args:
        windows: (n, length + 1) token windows.
        batch_size: windows per batch.

    Returns:
        The `eval_data` callable of `recipes.train.train`.
    """

    def batches() -> Iterator[Batch]:
        for i in range(0, len(windows), batch_size):
            ids = windows[i : i + batch_size]
            pad = batch_size - len(ids)
            mask = np.concatenate([np.ones(len(ids), np.float32), np.zeros(pad, np.float32)])
            yield {
                "ids": np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)]),
                "mask": mask,
            }

    return batches
