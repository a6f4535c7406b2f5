"""How a student learns from its teacher: the distillation recipe (`DistillConfig`),
its data (SALT_DS's hard-but-learnable windows), the losses, and `student_training`,
which hands all of it to the shared trainer (`recipes.train.train`)."""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from ._lm_batches import random_windows, train_batches
from ._student_build import check_context, check_vocab
from .config import ConfigError
from .distill import kd_token_losses, salt_alpha, salt_ds_scores, select_hard_learnable
from .models import BYTE_VOCAB, Transformer


@dataclasses.dataclass
class DistillConfig:
    """How a student learns. `alpha`: KD weight (1 = pure distillation) while KD is on;
    `n_kd`: steps of KD before plain CE ("salt", "salt_ds"); `ds_pool` random training
    windows are scored by the teacher and the `ds_fraction` hardest learnable ones
    (true token in the teacher's top `ds_k`) feed the KD phase of "salt_ds".

    Attributes:
        mode: "ce" (next-token cross-entropy only), "kd" (distillation throughout),
            "salt" (KD for `n_kd` steps, then CE), "salt_ds" (as "salt", the KD phase
            on the selected hard-but-learnable windows).
        alpha: KD weight while KD is on.
        temperature: softmax temperature of the KD term.
        n_kd: KD steps before plain CE ("salt", "salt_ds").
        ds_pool: random windows the teacher scores ("salt_ds").
        ds_fraction: share of the pool kept ("salt_ds").
        ds_k: a window is learnable when its true tokens are in the teacher's top
            `ds_k` ("salt_ds").
    """

    mode: Literal["ce", "kd", "salt", "salt_ds"] = "kd"
    alpha: float = 1.0
    temperature: float = 1.0
    n_kd: int = 100
    ds_pool: int = 1024
    ds_fraction: float = 0.5
    ds_k: int = 10


def check_distill(distill: DistillConfig, steps: int) -> None:
    """Raise a `ConfigError` naming the `distill.` key when the recipe cannot run.

    Args:
        distill: the recipe.
        steps: the run's train.steps.
    """
    if not 0.0 <= distill.alpha <= 1.0:
        raise ConfigError(f"distill.alpha={distill.alpha} must be in [0, 1].")
    if not distill.temperature > 0:
        raise ConfigError(f"distill.temperature={distill.temperature} must be > 0.")
    if distill.mode in ("salt", "salt_ds") and not 1 <= distill.n_kd <= steps:
        raise ConfigError(
            f"distill.n_kd={distill.n_kd} must be in [1, train.steps={steps}] for "
            f"distill.mode={distill.mode!r} (KD steps before plain next-token training)."
        )
    if distill.mode == "salt_ds":
        if not 0.0 < distill.ds_fraction <= 1.0:
            raise ConfigError(f"distill.ds_fraction={distill.ds_fraction} must be in (0, 1].")
        if not 1 <= distill.ds_k <= BYTE_VOCAB:
            raise ConfigError(f"distill.ds_k={distill.ds_k} must be in [1, {BYTE_VOCAB}].")
        if distill.ds_pool < 1:
            raise ConfigError(f"distill.ds_pool={distill.ds_pool} must be >= 1 window.")


def alpha_schedule(distill: DistillConfig) -> Callable[[int], float]:
    """The KD weight at each optimizer step under `distill.mode`.

    Args:
        distill: the recipe.

    Returns:
        step -> alpha.
    """
    if distill.mode == "ce":
        return lambda step: 0.0
    if distill.mode == "kd":
        return lambda step: distill.alpha
    return lambda step: float(salt_alpha(step, n_kd=distill.n_kd, alpha=distill.alpha))


@eqx.filter_jit
def _ds_scores(teacher, ids, k: int):
    return salt_ds_scores(jax.vmap(teacher)(ids[:, :-1]), ids[:, 1:], k=k)


def hard_learnable_windows(
    teacher: Transformer,
    data: np.ndarray,
    distill: DistillConfig,
    *,
    length: int,
    seed: int,
    batch_size: int = 64,
) -> Int[np.ndarray, "n length_plus_1"]:
    """SALT_DS: `distill.ds_pool` random windows scored by the teacher (`salt_ds_scores`),
    the `ds_fraction` with the highest median loss over learnable tokens kept.

    Args:
        teacher: the teacher that scores the windows.
        data: the training token stream.
        distill: the recipe (ds_pool, ds_fraction, ds_k).
        length: the input length.
        seed: the seed of the pool.
        batch_size: windows scored per teacher call.

    Returns:
        The kept (n, length + 1) windows.
    """
    pool = random_windows(data, np.random.default_rng([seed, 2]), distill.ds_pool, length)
    scores = np.concatenate(
        [
            np.asarray(_ds_scores(teacher, jnp.asarray(pool[i : i + batch_size]), distill.ds_k))
            for i in range(0, len(pool), batch_size)
        ]
    )
    keep = select_hard_learnable(scores, distill.ds_fraction)
    if len(keep) == 0:
        raise ValueError(
            "no training window has a token inside the teacher's top "
            f"distill.ds_k={distill.ds_k}; raise distill.ds_k or distill.ds_pool"
        )
    return pool[keep]


def _apply(model, x, key):
    keys = jr.split(key, x.shape[0])
    return jax.vmap(lambda ids, k: model(ids, key=k))(x, keys)


def _token_ce(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def lm_loss(model, state, batch, key):
    """Next-token cross-entropy (nats per byte): the trainer's `loss_fn` for a dense LM.

    Args:
        model: the language model.
        state: passed through.
        batch: {"ids": (B, T + 1)}.
        key: the dropout key.

    Returns:
        (loss, (state, {})).
    """
    ids = batch["ids"]
    loss = _token_ce(_apply(model, ids[:, :-1], key), ids[:, 1:]).mean()
    return loss, (state, {})


@functools.cache
def make_distill_loss(temperature: float):
    """The trainer's `loss_fn` for a student whose `state` is the teacher: per token
    (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T), alpha from the batch.
    The teacher runs only when some alpha > 0 (`lax.cond`), so CE phases cost no more
    than plain training. Cached per temperature, so runs share one compiled step.

    Args:
        temperature: the KD temperature T.

    Returns:
        `distill_loss(model, teacher, batch, key) -> (loss, (teacher, metrics))`.
    """

    def distill_loss(model, teacher, batch, key):
        ids, alpha = batch["ids"], batch["alpha"].astype(jnp.float32)
        x, y = ids[:, :-1], ids[:, 1:]
        logits = _apply(model, x, key).astype(jnp.float32)
        t_logits = jax.lax.cond(
            jnp.any(alpha > 0),
            lambda: jax.vmap(teacher)(x).astype(jnp.float32),
            lambda: jnp.zeros(logits.shape, jnp.float32),
        )
        losses = kd_token_losses(logits, t_logits, y, alpha=alpha[:, None], temperature=temperature)
        return losses.mean(), (teacher, {"ce": _token_ce(logits, y).mean(), "alpha": alpha.mean()})

    return distill_loss


def lm_eval(model, state, batch) -> dict[str, Float[Array, " batch"]]:
    """Per window: mean next-byte CE ("loss", nats), "bits_per_byte", and, when `state`
    is a teacher, "kl_to_teacher" (KL(teacher || model) per token, nats).

    Args:
        model: the language model (inference mode).
        state: the teacher, or None.
        batch: {"ids": (B, T + 1)}.

    Returns:
        {name: (B,) values}.
    """
    ids = batch["ids"]
    x, y = ids[:, :-1], ids[:, 1:]
    logits = jax.vmap(model)(x).astype(jnp.float32)
    loss = _token_ce(logits, y).mean(axis=-1)
    out = {"loss": loss, "bits_per_byte": loss / math.log(2)}
    if state is not None:
        log_p = jax.nn.log_softmax(jax.vmap(state)(x).astype(jnp.float32), axis=-1)
        log_q = jax.nn.log_softmax(logits, axis=-1)
        out["kl_to_teacher"] = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1).mean(axis=-1)
    return out


def student_training(
    teacher: Transformer,
    student: Transformer,
    distill: DistillConfig,
    *,
    data: np.ndarray,
    batch_size: int,
    length: int,
    steps: int,
    seed: int,
):
    """(state, loss_fn, train_data) for `recipes.train.train` to train `student` under
    `distill`; the state is the teacher in inference mode. Checks come first.

    Args:
        teacher: the teacher.
        student: the student to train.
        distill: the recipe.
        data: the training token stream.
        batch_size: windows per batch.
        length: the input length.
        steps: the run's train.steps.
        seed: the stream's seed.

    Returns:
        (state, loss_fn, train_data).
    """
    check_vocab(teacher, student)
    check_context(student, length)
    check_context(teacher, length)
    check_distill(distill, steps)
    teacher = eqx.nn.inference_mode(teacher)
    hard, hard_steps = None, 0
    if distill.mode == "salt_ds":
        hard = hard_learnable_windows(teacher, data, distill, length=length, seed=seed)
        hard_steps = distill.n_kd
    stream = train_batches(
        data,
        batch_size=batch_size,
        length=length,
        seed=seed,
        alpha=alpha_schedule(distill),
        hard=hard,
        hard_steps=hard_steps,
    )
    return teacher, make_distill_loss(distill.temperature), stream
