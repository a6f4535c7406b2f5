"""What the trainer consumes and produces: batches, loss and eval functions, the state
carried between steps, hooks, and the result."""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import optax
from jaxtyping import Array, PRNGKeyArray, PyTree

Batch = dict[str, Any]
LossFn = Callable[
    [PyTree, PyTree, Batch, PRNGKeyArray], tuple[Array, tuple[PyTree, dict[str, Array]]]
]
EvalFn = Callable[[PyTree, PyTree, Batch], dict[str, Array]]


REPLACED = "model replaced"
"""The `event` of the eval record made right after a hook replaced the model."""


class TrainState(NamedTuple):
    """What the trainer carries from step to step.

    Attributes:
        step: updates done so far.
        model: the current model.
        state: its non-trained state (BatchNorm statistics, a teacher...).
        opt_state: the optimizer state; None asks the trainer for a fresh one.
    """

    step: int
    model: PyTree
    state: PyTree
    opt_state: optax.OptState | None


class Hook(Protocol):
    """Called before every step with the current `TrainState`; returns it, possibly
    with another model. Return `opt_state=None` to get a freshly initialized one.
    When the model is replaced and evaluation is on, the trainer evaluates the model
    before (unless this step was just evaluated) and after, the latter recorded with
    `"event": REPLACED`.

    A hook that changes the model's structure must also survive resumption: define
    `checkpoint() -> dict` (JSON, saved with every checkpoint) and
    `restore(ts, saved) -> TrainState`, which gets the freshly built state at the
    checkpoint's step and returns it with that step's structure (values are then
    loaded from the checkpoint).
    """

    def __call__(self, ts: TrainState) -> TrainState:
        """Args:
            ts: the state before this step.

        Returns:
            The state to continue from (the same, or with another model).
        """
        ...


@dataclasses.dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
        model: the trained model.
        state: its final state.
        history: the metrics records (those of metrics.jsonl): train records every
            `log_every` steps, eval records every `eval_every` steps.
        resumed_from: the step the run resumed from (None for a fresh start;
            `config.steps` when a rerun found the run finished and had nothing left
            to do).
    """

    model: PyTree
    state: PyTree
    history: list[dict[str, Any]]
    resumed_from: int | None = None


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the message says at which step and
    what to change."""
