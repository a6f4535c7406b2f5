"""Evaluation harness: how far a compressed model is from its dense original.

Language models: `token_losses` -> `perplexity`, `bits_per_byte`. Classifiers:
`kl_divergence` (dense || compressed), `top1_agreement`, `accuracy`. Encoders:
`cosine_similarity` to the dense embeddings, `nearest_neighbour_agreement`. For all:
`param_count`, and `wall_time` (FLOPs: `lowrank.summary(model, example=...).flops`);
to compare models' speed, `seconds_in_turns` times them in turns and
`inference_seconds` times a task's jitted inference-mode `eval_fn`.
The array metrics are jnp functions of whole evaluation sets (jittable; the shape
checks are on static shapes) and return scalars; means are over every leading position.
"""

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PyTree

import lowrank

from ._report import inference_seconds as inference_seconds
from ._report import seconds_in_turns as seconds_in_turns


def _same_shape(name_a: str, a, name_b: str, b) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}; "
            "evaluate both models on the same inputs"
        )


def _logits_and_labels(logits, labels) -> None:
    if logits.ndim < 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {logits.shape} must be labels' shape {labels.shape} plus a class axis; "
            "pass one label per row of logits"
        )


def token_losses(
    logits: Float[ArrayLike, "*batch vocab"], targets: Int[ArrayLike, "*batch"]
) -> Float[Array, "*batch"]:
    """Cross-entropy of each target token under the logits, in nats (computed in float32).

    Args:
        logits: next-token logits.
        targets: the tokens that came next.

    Returns:
        `-log softmax(logits)[target]` per position.
    """
    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    _logits_and_labels(logits, targets)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def perplexity(losses: Float[ArrayLike, "..."]) -> Float[Array, ""]:
    """exp of the mean per-token loss.

    Args:
        losses: per-token cross-entropies in nats (`token_losses`), every evaluated token.

    Returns:
        The perplexity.
    """
    return jnp.exp(jnp.mean(jnp.asarray(losses, jnp.float32)))


def bits_per_byte(losses: Float[ArrayLike, "..."], n_bytes: int) -> Float[Array, ""]:
    """Total loss in bits over the UTF-8 bytes of the text those tokens encode:
    comparable across tokenizers.

    Args:
        losses: per-token cross-entropies in nats, every evaluated token.
        n_bytes: UTF-8 bytes of the evaluated (target) text
            (`recipes.data.text_bytes(tokenizer, targets)`).

    Returns:
        `sum(losses) / (ln 2 * n_bytes)`.
    """
    if not isinstance(n_bytes, int) or n_bytes < 1:
        raise ValueError(
            f"n_bytes must be a positive int (the byte count of the evaluated text), got {n_bytes!r}"
        )
    return jnp.sum(jnp.asarray(losses, jnp.float32)) / (math.log(2) * n_bytes)


ClassLogits = Float[ArrayLike, "*batch classes"]
"""Class scores of one model, on every position or example."""


def _logit_pair(dense_logits: ClassLogits, compressed_logits: ClassLogits) -> tuple[Array, Array]:
    """Both models' logits as arrays, checked to be of the same shape."""
    a, b = jnp.asarray(dense_logits), jnp.asarray(compressed_logits)
    _same_shape("dense_logits", a, "compressed_logits", b)
    return a, b


def kl_divergence(dense_logits: ClassLogits, compressed_logits: ClassLogits) -> Float[Array, ""]:
    """KL(dense || compressed) of the softmax distributions, in nats, mean over positions.

    Args:
        dense_logits: the dense model's logits.
        compressed_logits: the compressed model's logits on the same inputs.

    Returns:
        `mean(sum_c p_c (log p_c - log q_c))`, p from the dense logits.
    """
    p_logits, q_logits = _logit_pair(dense_logits, compressed_logits)
    log_p = jax.nn.log_softmax(p_logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def top1_agreement(dense_logits: ClassLogits, compressed_logits: ClassLogits) -> Float[Array, ""]:
    """Fraction of positions where both models' top class (argmax) is the same.

    Args:
        dense_logits, compressed_logits: as `kl_divergence`.

    Returns:
        The agreement in [0, 1].
    """
    a, b = _logit_pair(dense_logits, compressed_logits)
    return jnp.mean(jnp.argmax(a, axis=-1) == jnp.argmax(b, axis=-1))


def accuracy(
    logits: Float[ArrayLike, "*batch classes"], labels: Int[ArrayLike, "*batch"]
) -> Float[Array, ""]:
    """Fraction of positions whose argmax is the label.

    Args:
        logits: a model's logits.
        labels: the true classes.

    Returns:
        The accuracy in [0, 1].
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _logits_and_labels(logits, labels)
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def _unit_rows(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_similarity(
    dense: Float[ArrayLike, "*batch d"], compressed: Float[ArrayLike, "*batch d"]
) -> Float[Array, ""]:
    """Mean cosine similarity of each compressed embedding to its dense one.

    Args:
        dense: the dense model's embeddings, one per row.
        compressed: the compressed model's embeddings of the same inputs.

    Returns:
        The mean cosine in [-1, 1].
    """
    a, b = jnp.asarray(dense), jnp.asarray(compressed)
    _same_shape("dense", a, "compressed", b)
    return jnp.mean(jnp.sum(_unit_rows(a) * _unit_rows(b), axis=-1))


def nearest_neighbour_agreement(
    dense: Float[ArrayLike, "n d"], compressed: Float[ArrayLike, "n d"]
) -> Float[Array, ""]:
    """For each item, is its nearest OTHER item (by cosine similarity) the same under
    the dense and the compressed embeddings? The fraction of items where it is.

    Args:
        dense: the dense model's embeddings `(n, d)`, n >= 2.
        compressed: the compressed model's embeddings of the same n inputs.

    Returns:
        The agreement in [0, 1].
    """
    a, b = jnp.asarray(dense), jnp.asarray(compressed)
    _same_shape("dense", a, "compressed", b)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(
            f"embeddings must be (n, d) with n >= 2 items, got shape {a.shape}; "
            "embed at least two inputs"
        )

    def nearest(x):
        u = _unit_rows(x)
        sim = u @ u.T
        return jnp.argmax(jnp.where(jnp.eye(x.shape[0], dtype=bool), -jnp.inf, sim), axis=1)

    return jnp.mean(nearest(a) == nearest(b))


def param_count(model: PyTree) -> int:
    """Number of parameters: elements of every floating-point array in the model
    (a factorized layer counts its factors), as `lowrank.summary` counts them.

    Args:
        model: an Equinox model, dense or factorized.

    Returns:
        The count.
    """
    return lowrank.summary(model).total_params


def wall_time(fn, *args, repeats: int = 5) -> float:
    """Median wall time of `fn(*args)` in seconds, over `repeats` calls after one
    warm-up (compile) call, waiting for the result each time. To compare models, time
    them in turns with `seconds_in_turns`.

    Args:
        fn: the function, typically jitted.
        *args: its arguments.
        repeats: timed calls.

    Returns:
        Seconds per call (median).
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    return seconds_in_turns(lambda _, *a: fn(*a), [None], *args, rounds=1, repeats=repeats)[0]
