"""Data for the recipes: offline digits and photographs, prepared TFDS datasets, grain
pipelines, and real text (BBC News, Shakespeare) as token windows."""

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
from ._text_corpora import (
    TextSplit,
    bbc_articles,
    bbc_dir,
    bbc_split,
    shakespeare_split,
)
from ._tfds import tfds_source
from ._token_windows import text_bytes, token_windows, tokenize

__all__ = [
    "DIGITS_TEST_SIZE",
    "PHOTOS",
    "ArraySource",
    "Augment",
    "ImageDataset",
    "PhotoSplit",
    "TextSplit",
    "bbc_articles",
    "bbc_dir",
    "bbc_split",
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
    "shakespeare_split",
    "text_bytes",
    "tfds_source",
    "token_windows",
    "tokenize",
    "train_batches",
]
