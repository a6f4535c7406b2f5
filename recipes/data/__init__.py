"""Image data for the recipes: offline digits and photographs, prepared TFDS datasets,
grain pipelines."""

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
from ._photos import PHOTOS, PhotoSplit, photo, photo_crops, photo_split
from ._pipeline import Augment, eval_batches, train_batches
from ._tfds import tfds_source

__all__ = [
    "DIGITS_TEST_SIZE",
    "PHOTOS",
    "ArraySource",
    "Augment",
    "ImageDataset",
    "PhotoSplit",
    "digits",
    "eval_batches",
    "image_dataset",
    "normalize",
    "pad_crop",
    "photo",
    "photo_crops",
    "photo_split",
    "random_flip",
    "random_resized_crop",
    "resize",
    "resize_center_crop",
    "tfds_source",
    "train_batches",
]
