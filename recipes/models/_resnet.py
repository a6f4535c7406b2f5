"""ResNet-18/34/50 (He et al. 2016; torchvision's v1.5 layout: stride in the 3x3 conv).

Every conv is a plain `eqx.nn.Conv2d`, so low-rank selectors find them by type, at
torchvision-like paths: `conv1`, `layers.2.blocks.0.conv1`,
`layers.1.blocks.0.downsample.conv`, and the classifier `fc`.
"""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from ._init import build
from ._layers import Image, Logits, Stage, apply_norm, batch_norm, conv2d

Stem = Literal["imagenet", "cifar"]
"""The 7x7/2 conv + 3x3/2 max-pool ImageNet stem, or a 3x3/1 conv and no pool."""


class Downsample(eqx.Module):
    """1x1 strided conv + BatchNorm that matches the shortcut to the block's output."""

    conv: eqx.nn.Conv2d
    bn: eqx.nn.BatchNorm

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, key: PRNGKeyArray):
        self.conv = conv2d(in_channels, out_channels, 1, stride=stride, key=key)
        self.bn = batch_norm(out_channels)

    def __call__(self, x, state, *, inference=None):
        return apply_norm(self.bn, self.conv(x), state, inference)


class BasicBlock(eqx.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34).

    Args:
        in_channels: input channels.
        planes: output channels of both convs.
        stride: the first conv's stride (a 1x1 strided shortcut conv when it is not 1
            or the channels change).
        key: initializes the convs.
    """

    conv1: eqx.nn.Conv2d
    bn1: eqx.nn.BatchNorm
    conv2: eqx.nn.Conv2d
    bn2: eqx.nn.BatchNorm
    downsample: Downsample | None
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, *, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = conv2d(in_channels, planes, 3, stride=stride, key=k1)
        self.bn1 = batch_norm(planes)
        self.conv2 = conv2d(planes, planes, 3, key=k2)
        self.bn2 = batch_norm(planes)
        self.downsample = (
            Downsample(in_channels, planes, stride, key=k3)
            if stride != 1 or in_channels != planes
            else None
        )

    def __call__(self, x, state, *, inference=None):
        """Args:
            x: one (C, H, W) feature map.
            state: the BatchNorm state.
            inference: use running statistics (None: the BatchNorms' own setting).

        Returns:
            (output feature map, new state).
        """
        out, state = apply_norm(self.bn1, self.conv1(x), state, inference)
        out = jax.nn.relu(out)
        out, state = apply_norm(self.bn2, self.conv2(out), state, inference)
        if self.downsample is not None:
            x, state = self.downsample(x, state, inference=inference)
        return jax.nn.relu(out + x), state


class Bottleneck(eqx.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual (ResNet-50).

    Args:
        in_channels: input channels.
        planes: channels of the 1x1 reduce and the 3x3 conv; the block outputs
            4 * planes.
        stride: the 3x3 conv's stride (a 1x1 strided shortcut conv when it is not 1
            or the channels change).
        key: initializes the convs.
    """

    conv1: eqx.nn.Conv2d
    bn1: eqx.nn.BatchNorm
    conv2: eqx.nn.Conv2d
    bn2: eqx.nn.BatchNorm
    conv3: eqx.nn.Conv2d
    bn3: eqx.nn.BatchNorm
    downsample: Downsample | None
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, *, key: PRNGKeyArray):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        out_channels = planes * self.expansion
        self.conv1 = conv2d(in_channels, planes, 1, key=k1)
        self.bn1 = batch_norm(planes)
        self.conv2 = conv2d(planes, planes, 3, stride=stride, key=k2)
        self.bn2 = batch_norm(planes)
        self.conv3 = conv2d(planes, out_channels, 1, key=k3)
        self.bn3 = batch_norm(out_channels)
        self.downsample = (
            Downsample(in_channels, out_channels, stride, key=k4)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def __call__(self, x, state, *, inference=None):
        """Args:
            x: one (C, H, W) feature map.
            state: the BatchNorm state.
            inference: use running statistics (None: the BatchNorms' own setting).

        Returns:
            (output feature map, new state).
        """
        out, state = apply_norm(self.bn1, self.conv1(x), state, inference)
        out = jax.nn.relu(out)
        out, state = apply_norm(self.bn2, self.conv2(out), state, inference)
        out = jax.nn.relu(out)
        out, state = apply_norm(self.bn3, self.conv3(out), state, inference)
        if self.downsample is not None:
            x, state = self.downsample(x, state, inference=inference)
        return jax.nn.relu(out + x), state


class ResNet(eqx.Module):
    """An unbatched ResNet classifier: `model(x, state) -> (logits, state)` on a
    (C, H, W) image. Run it under `jax.vmap(..., axis_name="batch")` for BatchNorm.

    `stem="imagenet"` is the 7x7/2 conv + 3x3/2 max-pool stem; `stem="cifar"` is a
    3x3/1 conv and no pool, the usual choice for 32x32 inputs. `width` scales every
    stage (64 is the published network).

    Args:
        block: "basic" (`BasicBlock`) or "bottleneck" (`Bottleneck`).
        depths: blocks per stage ((2, 2, 2, 2) for ResNet-18); stage i has
            width * 2**i planes, and every stage after the first halves the resolution.
        num_classes: the classifier's outputs.
        stem: "imagenet" or "cifar".
        width: the first stage's width.
        in_channels: image channels.
        key: initializes the layers.
    """

    conv1: eqx.nn.Conv2d
    bn1: eqx.nn.BatchNorm
    maxpool: eqx.nn.MaxPool2d | None
    layers: tuple[Stage, ...]
    fc: eqx.nn.Linear

    def __init__(
        self,
        block: Literal["basic", "bottleneck"],
        depths: tuple[int, ...],
        *,
        num_classes: int,
        stem: Stem,
        width: int = 64,
        in_channels: int = 3,
        key: PRNGKeyArray,
    ):
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"block={block!r}: use 'basic' or 'bottleneck'.")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem={stem!r}: use 'imagenet' or 'cifar'.")
        block_cls = BasicBlock if block == "basic" else Bottleneck
        k_stem, k_fc, *k_stages = jax.random.split(key, 2 + len(depths))
        if stem == "imagenet":
            self.conv1 = conv2d(in_channels, width, 7, stride=2, key=k_stem)
            self.maxpool = eqx.nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = conv2d(in_channels, width, 3, key=k_stem)
            self.maxpool = None
        self.bn1 = batch_norm(width)
        channels = width
        stages = []
        for i, (depth, k_stage) in enumerate(zip(depths, k_stages)):
            planes = width * 2**i
            blocks = []
            for j, k_block in enumerate(jax.random.split(k_stage, depth)):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block_cls(channels, planes, stride, key=k_block))
                channels = planes * block_cls.expansion
            stages.append(Stage(tuple(blocks)))
        self.layers = tuple(stages)
        self.fc = eqx.nn.Linear(channels, num_classes, key=k_fc)

    def __call__(
        self, x: Image, state: eqx.nn.State, *, key: PRNGKeyArray | None = None, inference=None
    ) -> tuple[Logits, eqx.nn.State]:
        """Args:
            x: one (C, H, W) image.
            state: the BatchNorm state.
            key: ignored (ResNet has no stochastic layers).
            inference: use running statistics (None: the BatchNorms' own setting).

        Returns:
            (logits, new state).
        """
        del key  # ResNet has no stochastic layers
        x, state = apply_norm(self.bn1, self.conv1(x), state, inference)
        x = jax.nn.relu(x)
        if self.maxpool is not None:
            x = self.maxpool(x)
        for stage in self.layers:
            x, state = stage(x, state, inference=inference)
        return self.fc(jnp.mean(x, axis=(1, 2))), state


_BUILD_ARGS = """

    Args:
        num_classes: the classifier's outputs (1000: ImageNet).
        stem: "imagenet" (7x7/2 conv + max-pool) or "cifar" (3x3/1 conv, for 32x32).
        width: the first stage's width (64 is the published network).
        key: the initialization key (keyword-only).

    Returns:
        (model, state): the `ResNet` and its BatchNorm state.
    """


def _documented(summary: str):
    def wrap(builder):
        builder.__doc__ = summary + _BUILD_ARGS
        return builder

    return wrap


@_documented("ResNet-18 and its BatchNorm state (11,689,512 parameters at 1000 classes).")
def resnet18(
    num_classes: int = 1000, *, stem: Stem = "imagenet", width: int = 64, key: PRNGKeyArray
) -> tuple[ResNet, eqx.nn.State]:
    return build(
        ResNet, "basic", (2, 2, 2, 2), num_classes=num_classes, stem=stem, width=width, key=key
    )


@_documented("ResNet-34 and its BatchNorm state (21,797,672 parameters at 1000 classes).")
def resnet34(
    num_classes: int = 1000, *, stem: Stem = "imagenet", width: int = 64, key: PRNGKeyArray
) -> tuple[ResNet, eqx.nn.State]:
    return build(
        ResNet, "basic", (3, 4, 6, 3), num_classes=num_classes, stem=stem, width=width, key=key
    )


@_documented("ResNet-50 and its BatchNorm state (25,557,032 parameters at 1000 classes).")
def resnet50(
    num_classes: int = 1000, *, stem: Stem = "imagenet", width: int = 64, key: PRNGKeyArray
) -> tuple[ResNet, eqx.nn.State]:
    return build(
        ResNet, "bottleneck", (3, 4, 6, 3), num_classes=num_classes, stem=stem, width=width, key=key
    )
