"""EfficientNet-Lite0 (the TensorFlow "lite" EfficientNet for mobile accelerators).

EfficientNet-B0's stages without squeeze-excitation, with ReLU6 instead of swish and
the stem (32) and head (1280) widths fixed: MobileNetV2's inverted residuals with 3x3
and 5x5 depthwise kernels, TensorFlow's SAME padding and BatchNorm eps 1e-3 (what the
TF-trained weights expect). Layer paths are MobileNetV2's: `stem.conv`,
`stages.3.blocks.0.expand.conv`, `stages.3.blocks.0.depthwise.conv`,
`stages.3.blocks.0.project.conv`, `head.conv`, `classifier`.
"""

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from ._efficientnet import ConvBNAct
from ._mobilenet_v2 import Stage, classify, inverted_residual_stages

EFFICIENTNET_LITE0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
"""(expand ratio, kernel, stride, in channels, out channels, blocks) per stage."""

_PADDING = "SAME"
_EPS = 1e-3


class EfficientNetLite(eqx.Module):
    """An unbatched EfficientNet-Lite0 classifier: `model(x, state, key=...) ->
    (logits, state)` on a (C, H, W) image; run it under `jax.vmap(...,
    axis_name="batch")` for BatchNorm. Training mode needs a `key` (dropout);
    inference mode uses the running statistics. `blocks_per_stage=k` keeps the first
    k blocks of every stage (k=1: 7 of the 16 blocks), for fast tests.
    """

    stem: ConvBNAct
    stages: tuple[Stage, ...]
    head: ConvBNAct
    dropout: eqx.nn.Dropout
    classifier: eqx.nn.Linear

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        dropout: float = 0.2,
        blocks_per_stage: int | None = None,
        in_channels: int = 3,
        key: PRNGKeyArray,
    ):
        k_stem, k_stages, k_head, k_fc = jax.random.split(key, 4)
        act = {"activation": jax.nn.relu6, "padding": _PADDING, "eps": _EPS}
        self.stem = ConvBNAct(in_channels, 32, 3, stride=2, **act, key=k_stem)
        self.stages = inverted_residual_stages(
            EFFICIENTNET_LITE0_STAGES,
            blocks_per_stage=blocks_per_stage,
            padding=_PADDING,
            eps=_EPS,
            key=k_stages,
        )
        self.head = ConvBNAct(320, 1280, 1, **act, key=k_head)
        self.dropout = eqx.nn.Dropout(dropout)
        self.classifier = eqx.nn.Linear(1280, num_classes, key=k_fc)

    def __call__(
        self,
        x: Float[Array, "c h w"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[Float[Array, " classes"], eqx.nn.State]:
        return classify(self, x, state, key=key, inference=inference)
