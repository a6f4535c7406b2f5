"""The image classification task: a recipes.models classifier on digits or a prepared
TFDS dataset, with its loss and eval functions."""

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PRNGKeyArray, PyTree

from . import models
from ._task import Task
from .config import Config, ConfigError
from .train import Batch


def classification_loss(
    model: PyTree, state: PyTree, batch: Batch, key: PRNGKeyArray
) -> tuple[Array, tuple[PyTree, dict[str, Array]]]:
    """Mean softmax cross-entropy of `model` on a batch of images and integer labels;
    BatchNorm statistics are shared across the batch (the vmap axis).

    Args:
        model: an unbatched classifier, `model(x, state, key=key) -> (logits, state)`.
        state: its BatchNorm state.
        batch: {"image": (B, C, H, W), "label": (B,) int}.
        key: split into one key per example (dropout, stochastic depth).

    Returns:
        (loss, (new state, {"accuracy": batch top-1 accuracy})).
    """

    def apply(x, state, key):
        return model(x, state, key=key)

    keys = jax.random.split(key, len(batch["label"]))
    batched = jax.vmap(apply, axis_name=models.BATCH_AXIS, in_axes=(0, None, 0), out_axes=(0, None))
    logits, state = batched(batch["image"], state, keys)
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, (state, {"accuracy": accuracy})


def classification_eval(model: PyTree, state: PyTree, batch: Batch) -> dict[str, Array]:
    """Per-example cross-entropy and top-1 correctness of an inference-mode model.

    Args:
        model: an unbatched classifier, `model(x, state) -> (logits, state)`.
        state: its BatchNorm state.
        batch: {"image": (B, C, H, W), "label": (B,) int}.

    Returns:
        {"loss": (B,) cross-entropy, "accuracy": (B,) 1.0 where top-1 is right}.
    """

    def apply(x):
        return model(x, state)[0]

    logits = jax.vmap(apply, axis_name=models.BATCH_AXIS)(batch["image"]).astype(jnp.float32)
    return {
        "loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]),
        "accuracy": (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32),
    }


def image_classification(config: Config) -> Task:
    """An image classifier from recipes.models on digits or a prepared TFDS dataset."""
    from . import data as image_data

    d, m = config.data, config.model
    try:
        dataset = image_data.image_dataset(
            d.name,
            image_size=d.image_size,
            data_dir=d.data_dir,
            train_split=d.train_split,
            eval_split=d.eval_split,
        )
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"data.name={d.name!r}, data.image_size={d.image_size}: {e}") from e
    key = jax.random.key(config.train.seed)
    if m.name.startswith("resnet"):
        make = getattr(models, m.name)
        model, state = make(dataset.num_classes, stem=m.stem, width=m.width, key=key)
    else:
        model, state = models.efficientnet_b0(
            dataset.num_classes, dropout=m.dropout, stochastic_depth=m.stochastic_depth, key=key
        )
    return Task(
        model,
        state,
        classification_loss,
        classification_eval,
        image_data.train_batches(
            dataset,
            batch_size=d.batch_size,
            image_size=d.image_size,
            augment=d.augment,
            seed=config.train.seed,
            num_threads=d.num_threads,
        ),
        image_data.eval_batches(
            dataset,
            batch_size=d.eval_batch_size,
            image_size=d.image_size,
            augment=d.augment,
            num_threads=d.num_threads,
        ),
    )
