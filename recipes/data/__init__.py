"""Image data for the recipes: offline digits, prepared TFDS datasets, grain pipelines."""

from ._augment import (
    normalize,
    pad_crop,
    random_flip,
    random_resized_crop,
    resize,
    resize_center_crop,
)
from ._datasets import ImageDataset, image_dataset
from ._digits import DIGITS_TEST_SIZE, ArraySource, digits
from ._pipeline import Augment, eval_batches, train_batches
from ._tfds import tfds_source

__all__ = [
    "DIGITS_TEST_SIZE",
    "ArraySource",
    "Augment",
    "ImageDataset",
    "digits",
    "eval_batches",
    "image_dataset",
    "normalize",
    "pad_crop",
    "random_flip",
    "random_resized_crop",
    "resize",
    "resize_center_crop",
    "tfds_source",
    "train_batches",
]
