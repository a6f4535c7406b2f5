"""Compress torchvision's ImageNet MobileNetV2: its pointwise (1x1 expand, project and
head) convs and the classifier to 80% of their parameters with the whitened init,
calibrated on 128 random crops of 224x224 from half of the offline photographs (each
conv fitted to what its BatchNorm and ReLU6 make of it); evaluated on 64 crops of the
other photographs by KL to the dense model and top-1 agreement.

    python -m recipes.run compress_mobilenet_v2 --set factorize.rank=params:0.6 \\
        heal.steps=100
    python -m recipes.run compress_mobilenet_v2 --set model.blocks_per_stage=1  # a slice
"""

from recipes.compress import CompressConfig, pretrained_config


def config() -> CompressConfig:
    """This recipe (see the module docstring).

    Returns:
        Its `CompressConfig`, before `--set` overrides.
    """
    return pretrained_config(
        "mobilenet_v2", batch_size=16, calibration=128, evaluation=64, image_size=224
    )
