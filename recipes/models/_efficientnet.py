"""EfficientNet-B0 (Tan & Le 2019), with torchvision's layout and initialization.

MBConv blocks: 1x1 expand conv, depthwise kxk conv, squeeze-excitation, 1x1 project
conv, and a stochastic-depth residual. Convs are plain `eqx.nn.Conv2d` (depthwise via
`groups`), at paths such as `stages.3.blocks.0.expand.conv`,
`stages.3.blocks.0.depthwise.conv`, `stages.3.blocks.0.se.fc1`, `head.conv`,
and the classifier `classifier`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._init import build
from ._layers import ConvBNAct, Image, Logits, Stage, StochasticDepth, conv2d, pooled_logits

EFFICIENTNET_B0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
"""(expand ratio, kernel, stride, in channels, out channels, blocks) per stage."""


class SqueezeExcitation(eqx.Module):
    """Channel gating from globally pooled features: x * sigmoid(fc2(swish(fc1(pool x))))."""

    fc1: eqx.nn.Conv2d
    fc2: eqx.nn.Conv2d

    def __init__(self, channels: int, squeeze_channels: int, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.fc1 = conv2d(channels, squeeze_channels, 1, use_bias=True, key=k1)
        self.fc2 = conv2d(squeeze_channels, channels, 1, use_bias=True, key=k2)

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "c h w"]:
        scale = jnp.mean(x, axis=(1, 2), keepdims=True)
        scale = jax.nn.sigmoid(self.fc2(jax.nn.silu(self.fc1(scale))))
        return x * scale


class MBConv(eqx.Module):
    """Mobile inverted bottleneck with squeeze-excitation (the EfficientNet block).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        expand_ratio: the hidden width is in_channels * expand_ratio (1: no expand conv).
        kernel_size: the depthwise conv's kernel.
        stride: the depthwise conv's stride.
        drop_path: stochastic-depth rate of the residual branch (used only when the
            block has a residual: stride 1 and equal channels).
        key: initializes the convs.
    """

    expand: ConvBNAct | None
    depthwise: ConvBNAct
    se: SqueezeExcitation
    project: ConvBNAct
    drop_path: StochasticDepth | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        expand_ratio: int,
        kernel_size: int,
        stride: int,
        drop_path: float,
        key: PRNGKeyArray,
    ):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        hidden = in_channels * expand_ratio
        self.expand = ConvBNAct(in_channels, hidden, 1, key=k1) if hidden != in_channels else None
        self.depthwise = ConvBNAct(
            hidden, hidden, kernel_size, stride=stride, groups=hidden, key=k2
        )
        self.se = SqueezeExcitation(hidden, max(1, in_channels // 4), key=k3)
        self.project = ConvBNAct(hidden, out_channels, 1, activation=None, key=k4)
        residual = stride == 1 and in_channels == out_channels
        self.drop_path = StochasticDepth(drop_path) if residual else None

    def __call__(self, x, state, *, key=None, inference=None):
        """Args:
            x: one (C, H, W) feature map.
            state: the BatchNorm state.
            key: drop-path randomness (training mode only).
            inference: use running statistics and no drop-path (None: the layers'
                own setting).

        Returns:
            (output feature map, new state).
        """
        out = x
        if self.expand is not None:
            out, state = self.expand(out, state, inference=inference)
        out, state = self.depthwise(out, state, inference=inference)
        out = self.se(out)
        out, state = self.project(out, state, inference=inference)
        if self.drop_path is not None:
            out = x + self.drop_path(out, key=key, inference=inference)
        return out, state


class EfficientNet(eqx.Module):
    """An unbatched EfficientNet classifier: `model(x, state, key=...) -> (logits, state)`
    on a (C, H, W) image. Training mode needs a `key` (stochastic depth, dropout).

    Args:
        num_classes: the classifier's outputs.
        dropout: dropout rate before the classifier.
        stochastic_depth: drop-path rate, reached linearly over the blocks.
        in_channels: image channels.
        key: initializes the layers.
    """

    stem: ConvBNAct
    stages: tuple[Stage, ...]
    head: ConvBNAct
    dropout: eqx.nn.Dropout
    classifier: eqx.nn.Linear

    def __init__(
        self,
        *,
        num_classes: int,
        dropout: float = 0.2,
        stochastic_depth: float = 0.2,
        in_channels: int = 3,
        key: PRNGKeyArray,
    ):
        k_stem, k_head, k_fc, *k_stages = jax.random.split(key, 3 + len(EFFICIENTNET_B0_STAGES))
        self.stem = ConvBNAct(in_channels, EFFICIENTNET_B0_STAGES[0][3], 3, stride=2, key=k_stem)
        total = sum(stage[-1] for stage in EFFICIENTNET_B0_STAGES)
        index = 0
        stages = []
        for (ratio, kernel, stride, c_in, c_out, n), k_stage in zip(
            EFFICIENTNET_B0_STAGES, k_stages
        ):
            blocks = []
            for j, k_block in enumerate(jax.random.split(k_stage, n)):
                blocks.append(
                    MBConv(
                        c_in if j == 0 else c_out,
                        c_out,
                        expand_ratio=ratio,
                        kernel_size=kernel,
                        stride=stride if j == 0 else 1,
                        drop_path=stochastic_depth * index / total,
                        key=k_block,
                    )
                )
                index += 1
            stages.append(Stage(tuple(blocks)))
        self.stages = tuple(stages)
        last = EFFICIENTNET_B0_STAGES[-1][4]
        self.head = ConvBNAct(last, 4 * last, 1, key=k_head)
        self.dropout = eqx.nn.Dropout(dropout)
        self.classifier = eqx.nn.Linear(4 * last, num_classes, key=k_fc)

    def __call__(
        self, x: Image, state: eqx.nn.State, *, key: PRNGKeyArray | None = None, inference=None
    ) -> tuple[Logits, eqx.nn.State]:
        """Args:
            x: one (C, H, W) image.
            state: the BatchNorm state.
            key: stochastic depth and dropout randomness (training mode).
            inference: use running statistics, no drop-path and no dropout (None:
                the layers' own setting).

        Returns:
            (logits, new state).
        """
        blocks = [block for stage in self.stages for block in stage.blocks]
        keys = [None] * (len(blocks) + 1) if key is None else jax.random.split(key, len(blocks) + 1)
        x, state = self.stem(x, state, inference=inference)
        for block, k in zip(blocks, keys[:-1]):
            x, state = block(x, state, key=k, inference=inference)
        return pooled_logits(self, x, state, key=keys[-1], inference=inference)


def efficientnet_b0(
    num_classes: int = 1000,
    *,
    dropout: float = 0.2,
    stochastic_depth: float = 0.2,
    key: PRNGKeyArray,
) -> tuple[EfficientNet, eqx.nn.State]:
    """EfficientNet-B0 and its BatchNorm state (5,288,548 parameters at 1000 classes),
    initialized as torchvision does.

    Args:
        num_classes: the classifier's outputs (1000: ImageNet).
        dropout: dropout rate before the classifier.
        stochastic_depth: drop-path rate, reached linearly over the blocks.
        key: the initialization key (keyword-only).

    Returns:
        (model, state): the `EfficientNet` and its BatchNorm state.
    """
    return build(
        EfficientNet,
        num_classes=num_classes,
        dropout=dropout,
        stochastic_depth=stochastic_depth,
        linear_fan="out",
        key=key,
    )
