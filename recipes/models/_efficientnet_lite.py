"""EfficientNet-Lite0 (the TensorFlow "lite" EfficientNet for mobile accelerators).

EfficientNet-B0's stages without squeeze-excitation, with ReLU6 instead of swish and
the stem (32) and head (1280) widths fixed: MobileNetV2's inverted residuals with 3x3
and 5x5 depthwise kernels, TensorFlow's SAME padding and BatchNorm eps 1e-3 (what the
TF-trained weights expect). Layer paths are MobileNetV2's: `stem.conv`,
`stages.3.blocks.0.expand.conv`, `stages.3.blocks.0.depthwise.conv`,
`stages.3.blocks.0.project.conv`, `head.conv`, `classifier`.
"""

from typing import ClassVar

from ._efficientnet import EFFICIENTNET_B0_STAGES
from ._mobilenet_v2 import InvertedResidualNet

EFFICIENTNET_LITE0_STAGES = EFFICIENTNET_B0_STAGES
"""(expand ratio, kernel, stride, in channels, out channels, blocks) per stage: B0's."""


class EfficientNetLite(InvertedResidualNet):
    """An unbatched EfficientNet-Lite0 classifier: `model(x, state, key=...) ->
    (logits, state)` on a (C, H, W) image; run it under `jax.vmap(...,
    axis_name="batch")` for BatchNorm. Training mode needs a `key` (dropout);
    inference mode uses the running statistics. `blocks_per_stage=k` keeps the first
    k blocks of every stage (k=1: 7 of the 16 blocks), for fast tests.

    Args: as `InvertedResidualNet`.
    """

    table: ClassVar = EFFICIENTNET_LITE0_STAGES
    padding: ClassVar = "SAME"
    eps: ClassVar = 1e-3
