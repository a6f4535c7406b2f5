"""Distillation losses and schedules on logits of shape (..., vocab).

- `kd_loss`: (1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher_T || student_T)
  (Hinton et al.; the T^2 keeps the soft-target gradient scale independent of T).
- `kd_pt_targets`: Tang et al.'s KD-pt teacher (arXiv:2002.03532): the teacher's own
  probability on the true token, the rest spread uniformly over the other tokens.
- `salt_alpha`, `salt_ds_scores`, `select_hard_learnable`: SALT (arXiv:2410.18779):
  distill from a small model for the first n_kd steps, then plain next-token training;
  pick "hard but learnable" sequences with the small model's losses.
- `HiddenProjection`, `hidden_match_loss`: optional hidden-state matching through a
  learned linear map from the student's width to the teacher's.
- `cosine_distance_loss`: 1 - cosine between student and teacher vectors of the same
  width (embeddings or hidden states), e.g. to heal a compressed encoder.
- `save_topk_logits`, `load_topk_logits`, `topk_to_logits`: cache teacher logits on disk.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray


def _is_number(x) -> bool:
    """Python scalars are checked eagerly; traced values (e.g. a schedule) are not."""
    return isinstance(x, (int, float))


def _at_least_f32(x: Array) -> Array:
    """Softmax statistics in float32 even when the model computes in bf16."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _masked_mean(values: Float[Array, "..."], mask) -> Float[Array, ""]:
    """Mean over entries where mask is true (all entries when mask is None); 0 if none."""
    if mask is None:
        return jnp.mean(values)
    mask = jnp.broadcast_to(jnp.asarray(mask, values.dtype), values.shape)
    total = jnp.sum(mask)
    return jnp.where(total > 0, jnp.sum(values * mask) / jnp.maximum(total, 1), 0.0)


def _check_shapes(student_logits, teacher_logits, labels) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {student_logits.shape} and teacher_logits "
            f"{teacher_logits.shape} must have the same shape (..., vocab)"
        )
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels shape {labels.shape} must equal the logits' leading shape "
            f"{student_logits.shape[:-1]} (one label per token)"
        )


def kd_token_losses(
    student_logits: Float[Array, "... vocab"],
    teacher_logits: Float[Array, "... vocab"],
    labels: Int[Array, "..."],
    *,
    alpha: float,
    temperature: float,
) -> Float[Array, "..."]:
    """Per-token (1 - alpha) * CE + alpha * T^2 * KL(softmax(t/T) || softmax(s/T)).

    `alpha` may be traced (e.g. `salt_alpha(step, ...)` inside a jitted step); Python
    numbers are range-checked. The teacher gets no gradient. Teacher entries of
    probability 0 (logit -inf, e.g. from a top-k cache) add nothing to the KL.

    Args:
        student_logits: the student's logits.
        teacher_logits: the teacher's logits, same shape (no gradient flows to them).
        labels: the true next tokens, the logits' leading shape.
        alpha: the KD weight in [0, 1] (may be traced or broadcast per example).
        temperature: the softening temperature T > 0.

    Returns:
        The per-token losses, the labels' shape.
    """
    _check_shapes(student_logits, teacher_logits, labels)
    if _is_number(alpha) and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if _is_number(temperature) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student_logits = _at_least_f32(student_logits)
    teacher_logits = _at_least_f32(jax.lax.stop_gradient(teacher_logits))
    log_q = jax.nn.log_softmax(student_logits, axis=-1)
    ce = -jnp.take_along_axis(log_q, labels[..., None], axis=-1)[..., 0]
    log_p_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_q_t = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    p_t = jnp.exp(log_p_t)
    kl = jnp.sum(jnp.where(p_t > 0, p_t * (log_p_t - log_q_t), 0.0), axis=-1)
    return (1.0 - alpha) * ce + alpha * temperature**2 * kl


def kd_loss(
    student_logits: Float[Array, "... vocab"],
    teacher_logits: Float[Array, "... vocab"],
    labels: Int[Array, "..."],
    *,
    alpha: float,
    temperature: float,
    mask: ArrayLike | None = None,
) -> Float[Array, ""]:
    """`kd_token_losses` averaged over the tokens where `mask` (shape (...)) is true.

    alpha=0 is plain next-token cross-entropy; alpha=1 is pure distillation. To distill
    from a target distribution `probs` instead of logits (e.g. `kd_pt_targets`), pass
    `jnp.log(probs)` as `teacher_logits`.

    Args:
        student_logits: the student's logits.
        teacher_logits: the teacher's logits, same shape (no gradient flows to them).
        labels: the true next tokens, the logits' leading shape.
        alpha: the KD weight in [0, 1] (may be traced or broadcast per example).
        temperature: the softening temperature T > 0.
        mask: which tokens count (default all).

    Returns:
        The mean loss (0 when the mask is empty).
    """
    losses = kd_token_losses(
        student_logits, teacher_logits, labels, alpha=alpha, temperature=temperature
    )
    return _masked_mean(losses, mask)


def kd_pt_targets(
    teacher_logits: Float[Array, "... vocab"], labels: Int[Array, "..."]
) -> Float[Array, "... vocab"]:
    """KD-pt target probabilities: p_t = softmax(teacher)[label] kept on the true token,
    (1 - p_t) / (vocab - 1) on every other token. Rows sum to 1.

    Args:
        teacher_logits: the teacher's logits.
        labels: the true next tokens.

    Returns:
        The target probabilities, the logits' shape.
    """
    if labels.shape != teacher_logits.shape[:-1]:
        raise ValueError(
            f"labels shape {labels.shape} must equal the logits' leading shape "
            f"{teacher_logits.shape[:-1]} (one label per token)"
        )
    vocab = teacher_logits.shape[-1]
    if vocab < 2:
        raise ValueError(f"KD-pt needs a vocabulary of at least 2 tokens, got {vocab}")
    probs = jax.nn.softmax(_at_least_f32(jax.lax.stop_gradient(teacher_logits)), axis=-1)
    p_true = jnp.take_along_axis(probs, labels[..., None], axis=-1)
    is_true = jax.nn.one_hot(labels, vocab, dtype=bool)
    return jnp.where(is_true, p_true, (1.0 - p_true) / (vocab - 1))


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
    logits = _at_least_f32(logits)
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


class HiddenProjection(eqx.Module):
    """Learned map from the student's hidden width to the teacher's, for matching."""

    proj: eqx.nn.Linear

    def __init__(self, student_dim: int, teacher_dim: int, *, key: PRNGKeyArray):
        self.proj = eqx.nn.Linear(student_dim, teacher_dim, use_bias=False, key=key)

    def __call__(self, h: Float[Array, "... student_dim"]) -> Float[Array, "... teacher_dim"]:
        flat = h.reshape(-1, h.shape[-1])
        return jax.vmap(self.proj)(flat).reshape(*h.shape[:-1], -1)


def hidden_match_loss(
    projection: HiddenProjection,
    student_hidden: Float[Array, "... student_dim"],
    teacher_hidden: Float[Array, "... teacher_dim"],
    *,
    mask: ArrayLike | None = None,
) -> Float[Array, ""]:
    """Mean over (unmasked) tokens of mean_j (projection(student)_j - teacher_j)^2.
    The teacher gets no gradient; `mask` has the hidden states' leading shape.

    Args:
        projection: the learned student-to-teacher map.
        student_hidden: the student's hidden states.
        teacher_hidden: the teacher's, same leading shape.
        mask: which positions count (default all).

    Returns:
        The mean squared difference.
    """
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden {student_hidden.shape} and teacher_hidden "
            f"{teacher_hidden.shape} must share their leading (token) shape"
        )
    if projection.proj.in_features != student_hidden.shape[-1] or (
        projection.proj.out_features != teacher_hidden.shape[-1]
    ):
        raise ValueError(
            f"projection maps {projection.proj.in_features} -> "
            f"{projection.proj.out_features} but the hidden widths are student "
            f"{student_hidden.shape[-1]} and teacher {teacher_hidden.shape[-1]}; "
            "build HiddenProjection(student_dim, teacher_dim)"
        )
    diff = projection(student_hidden) - jax.lax.stop_gradient(teacher_hidden)
    return _masked_mean(jnp.mean(diff**2, axis=-1), mask)


def cosine_distance_loss(
    student: Float[Array, "... d"],
    teacher: Float[Array, "... d"],
    *,
    mask: ArrayLike | None = None,
) -> Float[Array, ""]:
    """Mean over (unmasked) positions of 1 - cos(student, teacher), in float32.

    Args:
        student: the student's vectors (embeddings or hidden states).
        teacher: the teacher's vectors at the same positions (no gradient flows to it).
        mask: true on the positions to average over, shape `student.shape[:-1]`;
            None averages over all of them.

    Returns:
        The loss, in [0, 2]; 0 when every student vector points the teacher's way.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {student.shape} and teacher {teacher.shape} must have the same "
            "shape (..., d); compare vectors of the same width at the same positions"
        )
    s = _at_least_f32(student)
    t = _at_least_f32(jax.lax.stop_gradient(teacher))
    norms = jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)
    cosine = jnp.sum(s * t, axis=-1) / jnp.maximum(norms, 1e-12)
    return _masked_mean(1.0 - cosine, mask)


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


__all__ = [
    "HiddenProjection",
    "cosine_distance_loss",
    "hidden_match_loss",
    "kd_loss",
    "kd_pt_targets",
    "kd_token_losses",
    "load_topk_logits",
    "salt_alpha",
    "salt_ds_scores",
    "save_topk_logits",
    "select_hard_learnable",
    "topk_to_logits",
]
