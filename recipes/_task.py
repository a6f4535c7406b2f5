"""What a task builder hands `recipes.run`: the model, its losses and data, and what to keep."""

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from jaxtyping import PyTree

from .train import Batch, EvalFn, LossFn, TrainResult


class Task(NamedTuple):
    """Everything a recipe trains: model, state, losses and data streams. A task
    builder `(Config) -> Task` registered in `recipes.run.TASKS` makes one.

    Attributes:
        model: the dense model to train (the factorization policy applies to it).
        state: its non-trained state (BatchNorm statistics), or None.
        loss_fn: `loss_fn(model, state, batch, key) -> (loss, (state, metrics))`.
        eval_fn: `eval_fn(model, state, batch) -> {name: per-example values}`.
        train_data: `train_data(step)` iterates over training batches from `step` on.
        eval_data: `eval_data()` iterates once over the evaluation batches.
        finish: if given, runs after training on the main process with the
            `TrainResult` and the output folder: it saves what the task keeps (e.g.
            the model) and returns its report, which `recipes.run` writes to
            report.json.
    """

    model: PyTree
    state: PyTree
    loss_fn: LossFn
    eval_fn: EvalFn
    train_data: Callable[[int], Iterator[Batch]]
    eval_data: Callable[[], Iterable[Batch]]
    finish: Callable[[TrainResult, Path], dict[str, Any]] | None = None
