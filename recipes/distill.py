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
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from ._salt import salt_alpha, salt_ds_scores, select_hard_learnable
from ._topk_cache import load_topk_logits, save_topk_logits, topk_to_logits


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
        student_logits, teacher_logits, labels, alpha, temperature: as `kd_token_losses`.
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


class HiddenProjection(eqx.Module):
    """Learned map from the student's hidden width to the teacher's, for matching.

    Args:
        student_dim: the student's hidden width.
        teacher_dim: the teacher's hidden width.
        key: initializes the bias-free linear map.
    """

    proj: eqx.nn.Linear

    def __init__(self, student_dim: int, teacher_dim: int, *, key: PRNGKeyArray):
        self.proj = eqx.nn.Linear(student_dim, teacher_dim, use_bias=False, key=key)

    def __call__(self, h: Float[Array, "... student_dim"]) -> Float[Array, "... teacher_dim"]:
        """Args:
            h: student hidden states (any leading shape).

        Returns:
            The projected states, with the same leading shape.
        """
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
