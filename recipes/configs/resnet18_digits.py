"""ResNet-18 (CIFAR stem) on scikit-learn's digits upscaled to 32x32, fully offline.

About 15 minutes on two CPU cores; `--set model.width=16` (same depth, a quarter of
the channels) takes under 3 minutes and reaches ~99% test accuracy.
"""

from recipes.config import (
    Config,
    ImageDataConfig,
    ImageModelConfig,
    OptimConfig,
    TrainConfig,
)


def config() -> Config:
    """This recipe (see the module docstring).

    Returns:
        Its `Config`, before `--set` overrides.
    """
    return Config(
        name="resnet18_digits",
        model=ImageModelConfig(name="resnet18", stem="cifar"),
        data=ImageDataConfig(
            name="digits", image_size=32, batch_size=64, eval_batch_size=128, augment="crop"
        ),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, warmup_steps=20),
        train=TrainConfig(steps=300, log_every=25, eval_every=100, checkpoint_every=100),
    )
