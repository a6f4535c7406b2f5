"""Real photographs that ship offline in scikit-image's and scikit-learn's wheels, and
random crops of them for ImageNet classifiers.

Calibration and evaluation crops always come from different photographs:
`photo_split` says which photographs are which, and `photo_crops` takes them by name.
"""

import dataclasses
import functools

import numpy as np
from jaxtyping import Float, UInt8

from ._augment import normalize, random_flip, random_resized_crop

# Real photographs only: no synthetic images (colorwheel, logo, checkerboard, ...),
# no duplicates (skimage's "cat" is "chelsea"; the right stereo view of the motorcycle
# is its left one), none too small to crop (lfw faces, microaneurysms).
_COLOR = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle",
    "china",
    "flower",
)
_GRAY = (
    "camera",
    "coins",
    "moon",
    "clock",
    "brick",
    "grass",
    "gravel",
    "page",
    "text",
    "cell",
)

PHOTOS = _COLOR + _GRAY
"""The names `photo` accepts: scikit-image's bundled photographs (the grayscale ones
are replicated to RGB) and scikit-learn's two sample images ("china", "flower")."""


@functools.cache
def _load(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        image = (
            skimage.data.stereo_motorcycle()[0]
            if name == "motorcycle"
            else getattr(skimage.data, name)()
        )
    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image.setflags(write=False)  # cached: callers share one copy
    return image


def photo(name: str) -> UInt8[np.ndarray, "h w 3"]:
    """One photograph as a read-only RGB uint8 array.

    Args:
        name: one of `PHOTOS`.

    Returns:
        The (H, W, 3) image.
    """
    if name not in PHOTOS:
        raise ValueError(
            f"photo {name!r} is not one of the offline photographs; use one of {PHOTOS}."
        )
    return _load(name)


@dataclasses.dataclass(frozen=True)
class PhotoSplit:
    """Disjoint photographs for calibrating (and healing) and for evaluating.

    Attributes:
        calibration: names (of `PHOTOS`) for calibration and healing.
        evaluation: names for evaluation, none shared with `calibration`.
    """

    calibration: tuple[str, ...]
    evaluation: tuple[str, ...]


def photo_split(*, seed: int = 0, evaluation_fraction: float = 0.5) -> PhotoSplit:
    """Split `PHOTOS` into calibration and evaluation photographs, never sharing one.

    Color and grayscale photographs are split separately, so both sides get some of
    each; the same seed gives the same split.

    Args:
        seed: which random split.
        evaluation_fraction: the share of each group that goes to evaluation.

    Returns:
        The `PhotoSplit`.
    """
    if not 0.0 < evaluation_fraction < 1.0:
        raise ValueError(
            f"evaluation_fraction={evaluation_fraction}: use a share strictly between 0 and 1 "
            "so both calibration and evaluation get photographs."
        )
    rng = np.random.default_rng(seed)
    calibration, evaluation = [], []
    for group in (_COLOR, _GRAY):
        order = [group[i] for i in rng.permutation(len(group))]
        n_eval = min(len(group) - 1, max(1, round(evaluation_fraction * len(group))))
        evaluation += order[:n_eval]
        calibration += order[n_eval:]
    return PhotoSplit(tuple(calibration), tuple(evaluation))


def photo_crops(
    names: tuple[str, ...] | list[str],
    count: int,
    *,
    normalization: tuple[tuple[float, ...], tuple[float, ...]],
    size: int = 224,
    scale: tuple[float, float] = (0.25, 1.0),
    seed: int = 0,
) -> Float[np.ndarray, "count 3 size size"]:
    """`count` random-resized crops with random left-right flips, taken in turn from
    the photographs `names`, normalized for a model and channels first.

    Args:
        names: the photographs to crop (e.g. `photo_split().evaluation`).
        count: how many crops.
        normalization: the model's (mean, std) per RGB channel of [0, 1] pixels, e.g.
            `recipes.pretrained.MOBILENET_V2_NORMALIZATION`.
        size: the side of the square crops.
        scale: the range of the share of a photograph's area each crop covers.
        seed: the same seed and names give the same crops.

    Returns:
        A float32 (count, 3, size, size) array; crop i comes from `names[i % len(names)]`.
    """
    if not names:
        raise ValueError(
            "names is empty: pass the photographs to crop, e.g. photo_split().evaluation."
        )
    if count < 1:
        raise ValueError(f"count={count}: ask for at least one crop.")
    mean, std = normalization
    out = np.empty((count, 3, size, size), np.float32)
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        image = random_resized_crop(photo(names[i % len(names)]), rng, size, scale=scale)
        out[i] = normalize(random_flip(image, rng), mean, std)
    return out
