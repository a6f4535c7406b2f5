"""Image classification datasets by name: offline digits, or a prepared TFDS dataset."""

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._digits import digits
from ._tfds import tfds_source

# Published per-channel statistics; other datasets are estimated from training images.
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """Train and eval sources of {"image": HWC uint8, "label": int}, with what the
    pipeline needs to know about them.

    Attributes:
        train: random-access training examples.
        eval: random-access evaluation examples.
        num_classes: number of labels.
        mean: per-channel mean on the [0, 1] scale (published, or estimated from
            training images).
        std: per-channel standard deviation on the [0, 1] scale.
    """

    train: Sequence[dict[str, Any]]
    eval: Sequence[dict[str, Any]]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _estimate_stats(source, limit: int = 1000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    images = [np.asarray(source[i]["image"]) for i in range(min(limit, len(source)))]
    pixels = np.concatenate([im.reshape(-1, im.shape[-1]) for im in images]) / 255.0
    return tuple(pixels.mean(0).tolist()), tuple(np.maximum(pixels.std(0), 1e-3).tolist())


def image_dataset(
    name: str,
    *,
    image_size: int,
    data_dir: str | None = None,
    train_split: str = "train",
    eval_split: str = "test",
) -> ImageDataset:
    """`name="digits"`: scikit-learn's digits upscaled to `image_size` with 3 channels
    (offline; its own fixed split, so the split names are ignored). Any other name:
    the TFDS dataset prepared under `data_dir`.

    Args:
        name: "digits" or a TFDS dataset name.
        image_size: side of the digits' images (TFDS images keep their size; the
            pipeline resizes them).
        data_dir: where the TFDS dataset is prepared (None: TFDS's default).
        train_split: TFDS split for training.
        eval_split: TFDS split for evaluation.

    Returns:
        The `ImageDataset`, with published channel statistics for cifar10 and
        imagenet2012, else statistics estimated from (up to 1,000) training images.
    """
    if name == "digits":
        train, test = digits(image_size=image_size, channels=3)
        return ImageDataset(train, test, 10, *_estimate_stats(train, len(train)))
    train = tfds_source(name, train_split, data_dir=data_dir)
    test = tfds_source(name, eval_split, data_dir=data_dir)
    num_classes = train.dataset_info.features["label"].num_classes
    mean, std = _STATS[name] if name in _STATS else _estimate_stats(train)
    return ImageDataset(train, test, num_classes, mean, std)
