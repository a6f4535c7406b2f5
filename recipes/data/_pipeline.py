"""grain pipelines that turn an image source into per-process batches.

Batches are dicts of NumPy arrays: "image" (B, C, H, W) float32, "label" (B,) int32,
and for evaluation "mask" (B,) float32 (0 marks padding). B is this process's share
of the global batch: process p of P reads rows [p*B, (p+1)*B) of every global batch,
so all hosts together see exactly the single-host stream.
"""

from collections.abc import Callable, Iterator
from typing import Literal

import grain
import jax
import numpy as np

from ._augment import (
    normalize,
    pad_crop,
    random_flip,
    random_resized_crop,
    resize,
    resize_center_crop,
)
from ._datasets import ImageDataset

Augment = Literal["none", "crop", "crop_flip", "inception"]


def _local_batch_size(batch_size: int, name: str) -> int:
    processes = jax.process_count()
    if batch_size % processes:
        raise ValueError(
            f"{name}={batch_size} is not divisible by the {processes} processes; "
            f"use a multiple of {processes}."
        )
    return batch_size // processes


def _fit(image: np.ndarray, size: int) -> np.ndarray:
    return image if image.shape[:2] == (size, size) else resize(image, size, size)


def train_batches(
    data: ImageDataset,
    *,
    batch_size: int,
    image_size: int,
    augment: Augment,
    seed: int,
    num_threads: int = 2,
) -> Callable[[int], Iterator[dict[str, np.ndarray]]]:
    """`batches(step)` iterates over training batches from global step `step` on:
    an endless stream, reshuffled every epoch, augmented per example, and the same
    for the same (seed, step), which makes resumed runs exact.

    Args:
        data: the dataset (its `train` source and channel statistics are used).
        batch_size: the global batch size (divisible by the number of processes).
        image_size: side of the images fed to the model.
        augment: "none" (resize only), "crop" (pad by image_size // 8 and crop),
            "crop_flip" (and mirror), or "inception" (random resized crop and mirror).
        seed: seed of the shuffling and the augmentation.
        num_threads: grain reader threads.

    Returns:
        `batches(step)`, an iterator of {"image", "label"} batches of this process's
        share of each global batch.
    """
    local = _local_batch_size(batch_size, "data.batch_size")

    def transform(example, rng: np.random.Generator):
        image = np.asarray(example["image"])
        if augment == "inception":
            image = random_flip(random_resized_crop(image, rng, image_size), rng)
        else:
            image = _fit(image, image_size)
            if augment in ("crop", "crop_flip"):
                image = pad_crop(image, rng, max(1, image_size // 8))
            if augment == "crop_flip":
                image = random_flip(image, rng)
        return {
            "image": normalize(image, data.mean, data.std),
            "label": np.int32(example["label"]),
        }

    stream = (
        grain.MapDataset.source(data.train)
        .shuffle(seed=seed)
        .repeat()
        .random_map(transform, seed=seed)
        .batch(local, drop_remainder=True)
    )
    stream = stream[jax.process_index() :: jax.process_count()]
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)

    def batches(step: int) -> Iterator[dict[str, np.ndarray]]:
        return iter(stream[step:].to_iter_dataset(options))

    return batches


def eval_batches(
    data: ImageDataset,
    *,
    batch_size: int,
    image_size: int,
    augment: Augment,
    num_threads: int = 2,
) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
    """`batches()` iterates once over the eval split in fixed-shape batches; the last
    global batch is padded, and "mask" marks the real examples.

    Args:
        data: the dataset (its `eval` source and channel statistics are used).
        batch_size: the global batch size (divisible by the number of processes).
        image_size: side of the images fed to the model.
        augment: the training augmentation; "inception" evaluates on center crops
            (`resize_center_crop`), the others on resized images.
        num_threads: grain reader threads.

    Returns:
        `batches()`, an iterator of {"image", "label", "mask"} batches of this
        process's share.
    """
    local = _local_batch_size(batch_size, "data.eval_batch_size")
    total = len(data.eval)
    num_batches = -(-total // batch_size)
    process = jax.process_index()

    def element(i: int):
        b, j = divmod(i, local)
        index = b * batch_size + process * local + j
        image = np.asarray(data.eval[min(index, total - 1)]["image"])
        if augment == "inception":
            image = resize_center_crop(image, image_size)
        else:
            image = _fit(image, image_size)
        return {
            "image": normalize(image, data.mean, data.std),
            "label": np.int32(data.eval[min(index, total - 1)]["label"]),
            "mask": np.float32(index < total),
        }

    dataset = grain.MapDataset.range(num_batches * local).map(element).batch(local)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)

    def batches() -> Iterator[dict[str, np.ndarray]]:
        return iter(dataset.to_iter_dataset(options))

    return batches
