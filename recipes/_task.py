"""What a task builder hands `recipes.run`: the model, its losses and data, and what to keep."""

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from jaxtyping import PyTree

from .train import Batch, EvalFn, LossFn, TrainResult


class Task(NamedTuple):
    """Everything a recipe trains: model, state, losses and data streams. `finish`, if
    given, runs after training on the main process with the result and the output
    folder: it saves what the task keeps (e.g. the model) and returns its report,
    which `recipes.run` writes to report.json."""

    model: PyTree
    state: PyTree
    loss_fn: LossFn
    eval_fn: EvalFn
    train_data: Callable[[int], Iterator[Batch]]
    eval_data: Callable[[], Iterable[Batch]]
    finish: Callable[[TrainResult, Path], dict[str, Any]] | None = None
