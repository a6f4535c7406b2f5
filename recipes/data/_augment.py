"""Per-example image transforms on HWC uint8 NumPy arrays (run in the data workers)."""

import math

import numpy as np
from jaxtyping import Float, UInt8
from PIL import Image


def pad_crop(
    image: UInt8[np.ndarray, "h w c"], rng: np.random.Generator, pad: int
) -> UInt8[np.ndarray, "h w c"]:
    """Zero-pad by `pad` pixels on each side, then crop a random window of the
    original size (the CIFAR translation augmentation).

    Args:
        image: an HWC uint8 image.
        rng: draws the window's offset.
        pad: pixels of zero padding on each side.

    Returns:
        An image of the input's shape.
    """
    h, w, _ = image.shape
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    return padded[top : top + h, left : left + w]


def random_flip(
    image: UInt8[np.ndarray, "h w c"], rng: np.random.Generator
) -> UInt8[np.ndarray, "h w c"]:
    """Mirror left-right with probability 1/2.

    Args:
        image: an HWC uint8 image.
        rng: draws the coin flip.

    Returns:
        The image, mirrored or as it was.
    """
    return image[:, ::-1] if rng.random() < 0.5 else image


def resize(
    image: UInt8[np.ndarray, "h w c"], height: int, width: int
) -> UInt8[np.ndarray, "height width c"]:
    """Bilinear resize to height x width (with PIL).

    Args:
        image: an HWC uint8 image with 1 or 3 channels.
        height: output height.
        width: output width.

    Returns:
        The resized image, with the input's channels.
    """
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = np.asarray(pil.resize((width, height), Image.BILINEAR))
    return out[..., None] if channels == 1 else out


def random_resized_crop(
    image: UInt8[np.ndarray, "h w c"],
    rng: np.random.Generator,
    size: int,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> UInt8[np.ndarray, "size size c"]:
    """Inception-style crop: a random window covering `scale` of the area with aspect
    ratio in `ratio`, resized to size x size (10 tries, then the central square).

    Args:
        image: an HWC uint8 image.
        rng: draws the window.
        size: side of the output.
        scale: range of the window's share of the image area.
        ratio: range of its aspect ratio (width / height), sampled log-uniformly.

    Returns:
        A size x size image.
    """
    h, w, _ = image.shape
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return resize(image[top : top + ch, left : left + cw], size, size)
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return resize(image[top : top + side, left : left + side], size, size)


def resize_center_crop(
    image: UInt8[np.ndarray, "h w c"], size: int, *, crop_fraction: float = 0.875
) -> UInt8[np.ndarray, "size size c"]:
    """Resize the shorter side to size / crop_fraction, then take the central
    size x size window (the standard ImageNet evaluation transform).

    Args:
        image: an HWC uint8 image.
        size: side of the output.
        crop_fraction: the kept share of the resized shorter side.

    Returns:
        A size x size image.
    """
    h, w, _ = image.shape
    short = int(round(size / crop_fraction))
    if h <= w:
        nh, nw = short, max(short, round(w * short / h))
    else:
        nh, nw = max(short, round(h * short / w)), short
    image = resize(image, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[top : top + size, left : left + size]


def normalize(
    image: UInt8[np.ndarray, "h w c"], mean: tuple[float, ...], std: tuple[float, ...]
) -> Float[np.ndarray, "c h w"]:
    """Scale to [0, 1], standardize per channel, and move channels first.

    Args:
        image: an HWC uint8 image.
        mean: per-channel mean, on the [0, 1] scale.
        std: per-channel standard deviation, on the [0, 1] scale.

    Returns:
        A CHW float32 array.
    """
    x = image.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
