"""scikit-learn's digits (1,797 real 8x8 handwritten digits) as an offline image dataset."""

import numpy as np
from jaxtyping import Int, UInt8

from ._augment import resize

DIGITS_TEST_SIZE = 297
"""Examples held out for evaluation (a fixed permutation, seed 0); 1,500 remain for training."""


class ArraySource:
    """A random-access source of {"image": HWC uint8, "label": int} examples in memory.

    Args:
        images: (n, h, w, c) uint8 images.
        labels: (n,) integer labels, one per image.
    """

    def __init__(self, images: UInt8[np.ndarray, "n h w c"], labels: Int[np.ndarray, " n"]):
        if len(images) != len(labels):
            raise ValueError(
                f"{len(images)} images but {len(labels)} labels; pass one label per image."
            )
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index], "label": self.labels[index]}


def digits(*, image_size: int = 8, channels: int = 1) -> tuple[ArraySource, ArraySource]:
    """The (train, test) split of the digits, as uint8 images of `image_size`
    (bilinear upscaling from 8x8) with `channels` identical channels.

    Args:
        image_size: side of the images (8 or more).
        channels: 1, or 3 (the gray channel replicated).

    Returns:
        (train, test) `ArraySource`s of 1,500 and `DIGITS_TEST_SIZE` examples, split
        by a fixed permutation.
    """
    from sklearn.datasets import load_digits

    if image_size < 8:
        raise ValueError(f"image_size={image_size} is below the digits' native 8x8; use 8 or more.")
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}: digits are grayscale, use 1 or 3 (replicated).")
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    if image_size != 8:
        images = np.stack([resize(im, image_size, image_size) for im in images])
    images = np.repeat(images, channels, axis=-1)
    labels = bunch.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(images))
    test, train = order[:DIGITS_TEST_SIZE], order[DIGITS_TEST_SIZE:]
    return ArraySource(images[train], labels[train]), ArraySource(images[test], labels[test])
