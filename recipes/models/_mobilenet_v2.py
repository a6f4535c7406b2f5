"""MobileNetV2 (Sandler et al. 2018), with torchvision's layout.

Inverted residual blocks: 1x1 expand conv, depthwise 3x3 conv (both BatchNorm + ReLU6),
then a linear 1x1 project conv + BatchNorm, with a residual where the shapes allow.
Convs are plain `eqx.nn.Conv2d` (depthwise via `groups`) inside the `ConvBNAct` layers
EfficientNet uses, at paths such as `stages.3.blocks.0.expand.conv`,
`stages.3.blocks.0.depthwise.conv`, `stages.3.blocks.0.project.conv`, `head.conv`,
and the classifier `classifier`. EfficientNet-Lite (recipes/models/_efficientnet_lite.py)
is built from the same blocks.
"""

from collections.abc import Sequence
from typing import ClassVar

import equinox as eqx
import jax
from jaxtyping import PRNGKeyArray

from ._layers import ConvBNAct, Image, Logits, Stage, pooled_logits

MOBILENET_V2_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 3, 2, 24, 32, 3),
    (6, 3, 2, 32, 64, 4),
    (6, 3, 1, 64, 96, 3),
    (6, 3, 2, 96, 160, 3),
    (6, 3, 1, 160, 320, 1),
)
"""(expand ratio, kernel, stride, in channels, out channels, blocks) per stage."""


class InvertedResidual(eqx.Module):
    """Expand (absent at expand ratio 1), depthwise, linear project; x + block(x) when
    the stride is 1 and the widths match. Convs use ReLU6 except the project conv.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        expand_ratio: the hidden width is in_channels * expand_ratio.
        kernel_size: the depthwise conv's kernel.
        stride: the depthwise conv's stride.
        padding: None (PyTorch's symmetric padding) or "SAME" (TensorFlow's).
        eps: the BatchNorms' epsilon.
        key: initializes the convs.
    """

    expand: ConvBNAct | None
    depthwise: ConvBNAct
    project: ConvBNAct
    residual: bool = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        expand_ratio: int,
        kernel_size: int,
        stride: int,
        padding: str | None = None,
        eps: float = 1e-5,
        key: PRNGKeyArray,
    ):
        k1, k2, k3 = jax.random.split(key, 3)
        hidden = in_channels * expand_ratio
        act = {"activation": jax.nn.relu6, "padding": padding, "eps": eps}
        self.expand = (
            ConvBNAct(in_channels, hidden, 1, **act, key=k1) if expand_ratio != 1 else None
        )
        self.depthwise = ConvBNAct(
            hidden, hidden, kernel_size, stride=stride, groups=hidden, **act, key=k2
        )
        self.project = ConvBNAct(
            hidden, out_channels, 1, activation=None, padding=padding, eps=eps, key=k3
        )
        self.residual = stride == 1 and in_channels == out_channels

    def __call__(self, x, state, *, inference=None):
        """Args:
            x: one (C, H, W) feature map.
            state: the BatchNorm state.
            inference: use running statistics (None: the BatchNorms' own setting).

        Returns:
            (output feature map, new state).
        """
        out = x
        if self.expand is not None:
            out, state = self.expand(out, state, inference=inference)
        out, state = self.depthwise(out, state, inference=inference)
        out, state = self.project(out, state, inference=inference)
        return (x + out if self.residual else out), state


def inverted_residual_stages(
    table: Sequence[tuple[int, int, int, int, int, int]],
    *,
    blocks_per_stage: int | None,
    padding: str | None,
    eps: float,
    key: PRNGKeyArray,
) -> tuple[Stage, ...]:
    """The stages of `table` rows (expand ratio, kernel, stride, in, out, blocks),
    keeping only the first `blocks_per_stage` blocks of each stage when it is set: the
    blocks dropped are residual ones, so the widths still chain and the head fits."""
    if blocks_per_stage is not None and (
        not isinstance(blocks_per_stage, int) or blocks_per_stage < 1
    ):
        raise ValueError(
            f"blocks_per_stage={blocks_per_stage!r}: use None for the whole network or a "
            "positive int to keep the first k blocks of every stage."
        )
    stages = []
    for (ratio, kernel, stride, c_in, c_out, n), k_stage in zip(
        table, jax.random.split(key, len(table))
    ):
        kept = n if blocks_per_stage is None else min(n, blocks_per_stage)
        blocks = tuple(
            InvertedResidual(
                c_in if j == 0 else c_out,
                c_out,
                expand_ratio=ratio,
                kernel_size=kernel,
                stride=stride if j == 0 else 1,
                padding=padding,
                eps=eps,
                key=k_block,
            )
            for j, k_block in enumerate(jax.random.split(k_stage, kept))
        )
        stages.append(Stage(blocks))
    return tuple(stages)


class InvertedResidualNet(eqx.Module):
    """Stem, stages of inverted residuals, head, pool, dropout, classifier: the network
    MobileNetV2 and EfficientNet-Lite share. A subclass names its stage `table`, conv
    `padding` (None: PyTorch's, "SAME": TensorFlow's) and BatchNorm `eps`.

    Args:
        num_classes: the classifier's outputs (1000: ImageNet).
        dropout: the dropout rate before the classifier.
        blocks_per_stage: None for the whole network, or k to keep k blocks a stage.
        in_channels: the input image's channels.
        key: the initialization key (keyword-only).
    """

    stem: ConvBNAct
    stages: tuple[Stage, ...]
    head: ConvBNAct
    dropout: eqx.nn.Dropout
    classifier: eqx.nn.Linear
    table: ClassVar[Sequence[tuple[int, int, int, int, int, int]]]
    padding: ClassVar[str | None]
    eps: ClassVar[float]

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
        act = {"activation": jax.nn.relu6, "padding": self.padding, "eps": self.eps}
        self.stem = ConvBNAct(in_channels, 32, 3, stride=2, **act, key=k_stem)
        self.stages = inverted_residual_stages(
            self.table,
            blocks_per_stage=blocks_per_stage,
            padding=self.padding,
            eps=self.eps,
            key=k_stages,
        )
        self.head = ConvBNAct(320, 1280, 1, **act, key=k_head)
        self.dropout = eqx.nn.Dropout(dropout)
        self.classifier = eqx.nn.Linear(1280, num_classes, key=k_fc)

    def __call__(
        self, x: Image, state: eqx.nn.State, *, key: PRNGKeyArray | None = None, inference=None
    ) -> tuple[Logits, eqx.nn.State]:
        """Args:
            x: one (C, H, W) image.
            state: the BatchNorm state.
            key: dropout randomness (training mode).
            inference: use running statistics and no dropout (None: the layers' own
                setting).

        Returns:
            (logits, new state).
        """
        x, state = self.stem(x, state, inference=inference)
        for stage in self.stages:
            x, state = stage(x, state, inference=inference)
        return pooled_logits(self, x, state, key=key, inference=inference)


class MobileNetV2(InvertedResidualNet):
    """An unbatched MobileNetV2 classifier: `model(x, state, key=...) -> (logits, state)`
    on a (C, H, W) image; run it under `jax.vmap(..., axis_name="batch")` for
    BatchNorm. Training mode needs a `key` (dropout); inference mode
    (`inference=True` or `eqx.nn.inference_mode`) uses the running statistics.

    `blocks_per_stage=k` keeps the first k blocks of every stage (k=1: 7 of the 17
    blocks), a smaller network with the same layer paths, for fast tests.

    Args: as `InvertedResidualNet`.
    """

    table: ClassVar = MOBILENET_V2_STAGES
    padding: ClassVar = None
    eps: ClassVar = 1e-5
