"""Typed recipe configs: nested dataclasses, `key=value` overrides, early validation.

A recipe is a Python file in recipes/configs/ whose `config()` returns a `Config`.
`python -m recipes.run NAME --set train.steps=100 --set optim.lr=0.05` loads it, applies
the overrides (parsed by each field's type), and validates everything before any
compute, with errors that name the offending key. Sections are plain dataclasses, so
a task may bring its own `model`/`data` sections: keys are looked up on the instance.
Numbers must be finite; fields declared with `bounded` must lie within their bounds,
other integers must not be negative.
"""

import dataclasses
import importlib
import importlib.util
import pkgutil
from pathlib import Path
from typing import Any, Literal

from ._config_values import ConfigError as ConfigError
from ._config_values import bounded as bounded
from ._config_values import override as override
from ._config_values import validate as validate


@dataclasses.dataclass
class ImageModelConfig:
    """An image classifier from recipes.models.

    Attributes:
        name: which builder (`resnet18`, `resnet34`, `resnet50`, `efficientnet_b0`).
        stem: ResNet stem: "imagenet" (7x7 stride 2 + max-pool) or "cifar" (3x3 stride 1).
        width: ResNet channels of the first stage (doubled per stage).
        dropout: EfficientNet dropout before the classifier.
        stochastic_depth: EfficientNet's drop-path rate, reached linearly over the
            blocks (block i of n drops with stochastic_depth * i / n).
    """

    name: Literal["resnet18", "resnet34", "resnet50", "efficientnet_b0"] = "resnet18"
    stem: Literal["imagenet", "cifar"] = "cifar"
    width: int = bounded(64, gt=0)
    dropout: float = bounded(0.2, ge=0, lt=1)
    stochastic_depth: float = bounded(0.2, ge=0, lt=1)


@dataclasses.dataclass
class ImageDataConfig:
    """`name="digits"` (offline) or a TFDS dataset prepared under `data_dir`.
    Batch sizes are global (all devices and hosts together).

    Attributes:
        name: "digits" or a TFDS dataset name ("cifar10", "imagenet2012", ...).
        data_dir: where the TFDS dataset is prepared (None: TFDS's default).
        image_size: side of the square images fed to the model.
        batch_size: global training batch size.
        eval_batch_size: global evaluation batch size (the last batch is padded).
        augment: training augmentation: none, pad-and-crop, crop and flip, or
            Inception-style random resized crops (evaluation then center-crops).
        train_split: TFDS split to train on (ignored for digits).
        eval_split: TFDS split to evaluate on (ignored for digits).
        num_threads: grain reader threads per pipeline.
    """

    name: str = "digits"
    data_dir: str | None = None
    image_size: int = bounded(32, gt=0)
    batch_size: int = bounded(128, gt=0)
    eval_batch_size: int = bounded(256, gt=0)
    augment: Literal["none", "crop", "crop_flip", "inception"] = "crop"
    train_split: str = "train"
    eval_split: str = "test"
    num_threads: int = 2


@dataclasses.dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (linear warm-up, then cosine or constant).

    Attributes:
        name: "sgd" (weight decay added to the gradient) or "adamw" (decoupled).
        lr: peak learning rate.
        momentum: SGD momentum (unused by AdamW).
        nesterov: SGD with Nesterov momentum.
        weight_decay: weight-decay coefficient.
        warmup_steps: steps of linear warm-up from 0 to `lr`.
        schedule: after the warm-up, cosine decay to 0 or constant.
        grad_clip: clip gradients to this global norm, or None.
    """

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = bounded(0.1, gt=0)
    momentum: float = bounded(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = bounded(5e-4, ge=0)
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = bounded(None, gt=0)


@dataclasses.dataclass
class TrainConfig:
    """Trainer knobs.

    Attributes:
        steps: optimizer updates in the run.
        log_every: steps between logged training metrics (0: only the last).
        eval_every: steps between evaluations (0: after the last step only).
        checkpoint_every: steps between checkpoints (0: after the last step only).
        keep_checkpoints: how many checkpoints to keep on disk.
        seed: seed of the model, data order and step keys.
        precision: "fp32", or "bf16" compute over float32 master weights.
        out_dir: output folder ("": out/<config name>).
        resume: resume from the latest checkpoint in `out_dir` if there is one.
        progress: show a progress bar.
    """

    steps: int = bounded(1000, gt=0)
    log_every: int = 50
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = bounded(1, gt=0)
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    out_dir: str = ""
    resume: bool = True
    progress: bool = True


@dataclasses.dataclass
class FactorizeConfig:
    """Which layers become low-rank, when, and how (see recipes/_factorize_policy.py).

    `rank`: an int, a fraction of full rank, "energy:0.9", "params:0.3" / "flops:0.3"
    for a global budget, or "stable" / "stable:scaled" for each layer's (scaled)
    stable rank at factorization time (Cuttlefish). `warmup_steps`: dense steps before
    factorizing in place (Pufferfish's hybrid warm-up; 0 factorizes before training).
    `frobenius_decay`: decay the factors through u @ v with this coefficient instead of
    plain weight decay (Khodak et al.). `calibration`: training images fed to
    data-aware inits ("nkp" optionally, "whitened" needs them).

    Attributes:
        policy: which layers become low-rank: "none" (no factorization), "khodak"
            (every ResNet block conv), "pufferfish" (the last ResNet stage's convs),
            "efficientnet" (the expand, project and head convs).
        rank: the rank rule, as above.
        init: a registered initializer name (`lowrank.available_initializers()`).
        warmup_steps: dense training steps before factorizing.
        frobenius_decay: Frobenius decay coefficient, or None for plain weight decay.
        calibration: number of training images for data-aware inits (0: none).
    """

    policy: Literal["none", "khodak", "pufferfish", "efficientnet"] = "none"
    rank: int | float | str = 0.25
    init: str = "spectral"
    warmup_steps: int = 0
    frobenius_decay: float | None = bounded(None, ge=0)
    calibration: int = 0


@dataclasses.dataclass
class Config:
    """One recipe: a task (how to build model, data and losses) and its sections.

    Attributes:
        name: the recipe's name (also the default output folder, out/<name>).
        task: a key of `recipes.run.TASKS` or `recipes.run.PIPELINES`.
        model: the model section (the task's own dataclass; images: `ImageModelConfig`).
        data: the data section (the task's own dataclass; images: `ImageDataConfig`).
        optim: optimizer and schedule.
        train: trainer settings.
        factorize: what becomes low-rank, when and how.
    """

    name: str
    task: str = "image_classification"
    model: Any = dataclasses.field(default_factory=ImageModelConfig)
    data: Any = dataclasses.field(default_factory=ImageDataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    factorize: FactorizeConfig = dataclasses.field(default_factory=FactorizeConfig)


def load_config(name: str, overrides: list[str] = ()) -> Config:
    """The `config()` of recipes/configs/<name>.py (or of a .py file path), with the
    `key=value` overrides applied, validated.

    Args:
        name: a module name in recipes/configs/ ("digits_demo") or a path ending in .py.
        overrides: "dotted.key=value" assignments, applied in order.

    Returns:
        The validated `Config`.

    Raises:
        ConfigError: an unknown config (listing the available ones), a missing file,
            a module without `config()`, or a bad override or value.
    """
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"config file {name!r} does not exist.")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        import recipes.configs

        available = sorted(m.name for m in pkgutil.iter_modules(recipes.configs.__path__))
        if name not in available:
            raise ConfigError(
                f"unknown config {name!r}; available: {', '.join(available)} "
                "(or a path to a .py file)."
            )
        module = importlib.import_module(f"recipes.configs.{name}")
    if not callable(getattr(module, "config", None)):
        raise ConfigError(f"config {name!r} defines no config() function returning a Config.")
    config = module.config()
    for assignment in overrides:
        config = override(config, assignment)
    return validate(config)
