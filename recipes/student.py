"""Students of a byte-level teacher language model: build them, train them, score them.

A student is either the teacher factorized by `lowrank` under a parameter budget over
its attention projections and MLPs (factors initialized from the teacher's weights:
spectral, whitened or NKP with calibration text; embeddings stay dense), or a dense
`Transformer` of the teacher's depth, narrowed to a matching parameter count and
trained from scratch.

Training uses the shared trainer (`recipes.train.train`). The teacher rides in the
trainer's `state` slot, so it enters the jitted step as an argument, and every batch
carries its distillation weight `alpha` per example, so one compiled step serves:
"ce" (alpha 0, the teacher is never run), "kd" (alpha fixed), "salt" (KD for the first
n_kd steps, then CE; arXiv:2410.18779) and "salt_ds" (SALT whose KD phase trains on
the windows the teacher scores hard but learnable).

    python -m recipes.student shakespeare_teacher                 # dense teacher
    python -m recipes.student shakespeare_student --set distill.mode=salt
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._lm_batches import Batch, eval_batches, random_windows, train_batches
from ._lm_checkpoint import load_lm, save_lm
from ._report import seconds_in_turns
from ._student_build import (
    FACTORIZE_TARGET,
    check_context,
    check_vocab,
    dense_student,
    factorized_student,
    non_embedding_params,
    transformer_kwargs,
)
from ._student_training import (
    DistillConfig,
    alpha_schedule,
    check_distill,
    hard_learnable_windows,
    lm_eval,
    lm_loss,
    make_distill_loss,
    student_training,
)
from .longcontext import likelihood_accuracy, make_list_tasks
from .models import Transformer


@eqx.filter_jit
def _summed_loss(model, batch):
    return jnp.sum(lm_eval(model, None, batch)["loss"] * batch["mask"])


def validation_loss(model, windows: np.ndarray, *, batch_size: int = 32) -> float:
    """Mean next-byte cross-entropy (nats) over `windows` (every window counts once).

    Args:
        model: the language model.
        windows: (n, length + 1) token windows.
        batch_size: windows per forward.

    Returns:
        The mean loss in nats.
    """
    model = eqx.nn.inference_mode(model)
    total = sum(float(_summed_loss(model, b)) for b in eval_batches(windows, batch_size)())
    return total / len(windows)


def latent_list_accuracy(model: Transformer, *, n_tasks: int = 48, seed: int = 0):
    """(accuracy, tasks scored) on latent-list questions that fit the model's context,
    4-way multiple choice by likelihood (chance 0.25).

    Args:
        model: the language model.
        n_tasks: how many tasks to score at most.
        seed: the tasks' seed.

    Returns:
        (accuracy, number of tasks scored).
    """
    tasks = make_list_tasks(4 * n_tasks, seed=seed, n_ops=3, n_distractors=2)
    longest = max(len(c) for t in tasks for c in t.candidates) + 1
    fit = [t for t in tasks if len(t.prompt.encode()) + longest <= model.context][:n_tasks]
    if not fit:
        raise ValueError(
            f"no latent-list task fits the model context {model.context}; "
            "use a model with a context of at least 128 bytes"
        )
    return likelihood_accuracy(eqx.nn.inference_mode(model), fit), len(fit)


@eqx.filter_jit
def _forward(model, ids):
    return jax.vmap(model)(ids)


def tokens_per_second(model, *, batch_size: int = 16, length: int = 128, repeats: int = 5) -> float:
    """Inference throughput: tokens scored per second by one jitted batched forward
    (`batch_size` windows of `length` bytes), median over `repeats` calls.

    Args:
        model: the language model.
        batch_size: windows per forward.
        length: tokens per window.
        repeats: timed calls.

    Returns:
        Tokens per second.
    """
    ids = jnp.zeros((batch_size, length), jnp.int32)
    model = eqx.nn.inference_mode(model)
    return (
        batch_size * length / seconds_in_turns(_forward, [model], ids, rounds=1, repeats=repeats)[0]
    )


def step_seconds(history: list[dict], batch_size: int) -> float:
    """Mean seconds per train step over the trainer's logging windows, the first (which
    holds the compile) left out when there are others; a mean, so a recipe whose phases
    cost differently (SALT: KD, then CE) is charged its average step.

    Args:
        history: the trainer's records.
        batch_size: examples per step.

    Returns:
        Seconds per step.
    """
    rates = [r["examples_per_s"] for r in history if r["split"] == "train"]
    rates = rates[1:] if len(rates) > 1 else rates
    if not rates:
        raise ValueError("the history has no train records; set train.log_every > 0")
    return float(np.mean([batch_size / r for r in rates]))


def main(argv: list[str] | None = None) -> None:
    """`python -m recipes.student CONFIG [--set key=value ...]`: `recipes.run`'s command
    line for the text tasks only (train, save the model, score).

    Args:
        argv: the arguments (default sys.argv[1:]).
    """
    from . import run  # run.py imports the text tasks, which import this module

    run.main(
        argv,
        prog="python -m recipes.student",
        tasks=("text_lm", "text_student"),
        description="Train a byte-level teacher or student.",
    )


__all__ = [
    "FACTORIZE_TARGET",
    "Batch",
    "DistillConfig",
    "alpha_schedule",
    "check_context",
    "check_distill",
    "check_vocab",
    "dense_student",
    "eval_batches",
    "factorized_student",
    "hard_learnable_windows",
    "latent_list_accuracy",
    "lm_eval",
    "lm_loss",
    "load_lm",
    "main",
    "make_distill_loss",
    "non_embedding_params",
    "random_windows",
    "save_lm",
    "step_seconds",
    "student_training",
    "tokens_per_second",
    "train_batches",
    "transformer_kwargs",
    "validation_loss",
]

if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
