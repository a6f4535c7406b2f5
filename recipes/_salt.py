"""SALT (arXiv:2410.18779): distill from a small model for the first n_kd steps, then
plain next-token training; pick "hard but learnable" sequences with the small model's
losses."""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int


def salt_alpha(step: ArrayLike, *, n_kd: int, alpha: float, decay: int = 0) -> Float[Array, ""]:
    """SALT distillation weight at optimizer step `step` (0-based; traced is fine).

    alpha for steps 0 .. n_kd - 1. With decay=0 the switch is abrupt: 0 from step n_kd
    on. With decay > 0 the weight falls linearly after the KD phase,
    alpha * (1 - (step - n_kd) / decay) for n_kd <= step < n_kd + decay (so alpha at
    step n_kd), and is 0 from step n_kd + decay on.

    Args:
        step: the optimizer step.
        n_kd: the KD phase's steps.
        alpha: the KD weight during it, in [0, 1].
        decay: the steps of the linear fall after it (0: abrupt).

    Returns:
        The weight at `step`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if n_kd < 0:
        raise ValueError(f"n_kd must be >= 0 steps, got {n_kd}")
    if decay < 0:
        raise ValueError(f"decay must be >= 0 steps (0 = abrupt switch), got {decay}")
    step = jnp.asarray(step, jnp.float32)
    if decay == 0:
        return jnp.where(step < n_kd, alpha, 0.0)
    ramp = jnp.clip(1.0 - (step - n_kd) / decay, 0.0, 1.0)
    return alpha * jnp.where(step < n_kd, 1.0, ramp)


def salt_ds_scores(
    logits: Float[Array, "batch T vocab"],
    labels: Int[Array, "batch T"],
    *,
    k: int = 10,
    mask: ArrayLike | None = None,
) -> Float[Array, " batch"]:
    """SALT_DS score per sequence, from the SMALL model's logits on it.

    A token is "learnable" when its true next token is in the small model's top-k
    (fewer than k vocabulary entries have a strictly larger logit); the score is the
    median (numpy convention: mean of the two middle values for an even count) of the
    per-token cross-entropy over the learnable, unmasked tokens. High score = hard but
    learnable. A sequence without any learnable token scores -inf, so it ranks last
    and `select_hard_learnable` never picks it.

    Args:
        logits: the small model's logits on the sequences.
        labels: their true next tokens.
        k: a token is learnable when its label is in the top k.
        mask: which tokens count (default all).

    Returns:
        One score per sequence.
    """
    if logits.ndim < 2 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"logits must be (..., T, vocab) and labels (..., T) matching it; got "
            f"logits {logits.shape} and labels {labels.shape}"
        )
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be in [1, vocab={logits.shape[-1]}], got {k}")
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 models
    log_q = jax.nn.log_softmax(logits, axis=-1)
    true_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)
    rank = jnp.sum(logits > true_logit, axis=-1)
    loss = -jnp.take_along_axis(log_q, labels[..., None], axis=-1)[..., 0]
    keep = rank < k
    if mask is not None:
        keep = keep & jnp.broadcast_to(jnp.asarray(mask, bool), keep.shape)
    n = jnp.sum(keep, axis=-1)
    ordered = jnp.sort(jnp.where(keep, loss, jnp.inf), axis=-1)
    lo = jnp.take_along_axis(ordered, jnp.maximum(n - 1, 0)[..., None] // 2, axis=-1)[..., 0]
    hi = jnp.take_along_axis(ordered, (n // 2)[..., None], axis=-1)[..., 0]
    return jnp.where(n > 0, (lo + hi) / 2, -jnp.inf)


def select_hard_learnable(scores: ArrayLike, fraction: float) -> Int[np.ndarray, " n_selected"]:
    """Indices of the round(fraction * len(scores)) highest-scoring sequences, highest
    first (ties by index), skipping non-finite scores; fewer if fewer are finite.

    Args:
        scores: one `salt_ds_scores` score per sequence.
        fraction: the share to keep, in (0, 1].

    Returns:
        The kept indices.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D (one per sequence), got shape {scores.shape}")
    n_keep = int(round(fraction * scores.shape[0]))
    finite = np.flatnonzero(np.isfinite(scores))
    order = finite[np.argsort(-scores[finite], kind="stable")]
    return order[:n_keep]
