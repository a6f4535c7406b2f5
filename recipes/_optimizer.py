"""The trainer's optimizer: a unit-learning-rate optax chain plus the schedule the
trainer multiplies its updates by."""

import optax

from . import _frobenius_decay
from .config import ConfigError, OptimConfig


def make_optimizer(
    config: OptimConfig, total_steps: int, *, frobenius_decay: float | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """A unit-learning-rate optimizer and the schedule the trainer multiplies its
    updates by. Keeping the schedule outside the optimizer state lets a hook
    re-initialize the optimizer (new parameter shapes) without restarting the schedule.
    SGD decays weights PyTorch-style (added to the gradient); AdamW decoupled.
    `frobenius_decay` (a coefficient) decays the factors of low-rank layers through
    their product u @ v instead (see recipes/_frobenius_decay.py).

    Args:
        config: the optimizer settings.
        total_steps: the run's steps (the cosine schedule's length).
        frobenius_decay: the factor-product decay coefficient, or None.

    Returns:
        (optimizer, schedule).
    """
    if config.warmup_steps > total_steps:
        raise ConfigError(
            f"optim.warmup_steps={config.warmup_steps} exceeds train.steps={total_steps}; "
            "shorten the warm-up."
        )
    if config.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, config.lr, config.warmup_steps, max(total_steps, config.warmup_steps + 1)
        )
    else:
        schedule = optax.join_schedules(
            [
                optax.linear_schedule(0.0, config.lr, config.warmup_steps),
                optax.constant_schedule(config.lr),
            ],
            [config.warmup_steps],
        )
    decay = [optax.add_decayed_weights(config.weight_decay)]
    if frobenius_decay is not None:
        decay = [
            optax.add_decayed_weights(config.weight_decay, mask=_frobenius_decay.not_factors),
            _frobenius_decay.frobenius_decay(frobenius_decay),
        ]
    if config.name == "sgd":
        parts = [*decay, optax.trace(decay=config.momentum, nesterov=config.nesterov)]
    else:
        parts = [optax.scale_by_adam(), *decay]
    if config.grad_clip is not None:
        parts.insert(0, optax.clip_by_global_norm(config.grad_clip))
    return optax.chain(*parts, optax.scale(-1.0)), schedule
