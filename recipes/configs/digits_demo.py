"""`make demo`: ResNet-18 (width 16, CIFAR stem) on the offline digits, trained dense for a
warm-up, factorized in place under a 25% parameter budget with NKP init, fine-tuned.

Prints the plan, then params/FLOPs before and after, the eval accuracy at the end of the
warm-up, right after factorization and at the end, and the measured inference-time
ratio next to the FLOP ratio. A few minutes on two CPU cores.
"""

from recipes.config import (
    Config,
    FactorizeConfig,
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
        name="digits_demo",
        model=ImageModelConfig(name="resnet18", stem="cifar", width=16),
        data=ImageDataConfig(
            name="digits", image_size=32, batch_size=64, eval_batch_size=128, augment="crop"
        ),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, warmup_steps=10),
        train=TrainConfig(steps=200, log_every=10, eval_every=100, resume=False),
        factorize=FactorizeConfig(
            policy="khodak", rank="params:0.25", init="nkp", warmup_steps=100
        ),
    )
