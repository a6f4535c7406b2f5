"""The sections of a compress recipe's config, and the checks that run before any compute.

`python -m recipes.run compress_smollm2 --set factorize.rank=params:0.6 heal.steps=100`
loads a `CompressConfig` from recipes/configs/ and applies the overrides; `check` then
rejects what cannot work (a budget outside (0, 1], a key that does not apply to the
model, an unknown initializer...) before a model is loaded.
"""

import dataclasses
from typing import Literal

import lowrank

from ._policy_ranks import _rank_rule
from .config import ConfigError, OptimConfig, bounded

LANGUAGE_MODELS = ("smollm2",)
ENCODERS = ("minilm",)
CLASSIFIERS = ("mobilenet_v2", "efficientnet_lite0")
_MAX_LAYERS = {"smollm2": 30, "minilm": 6}


@dataclasses.dataclass
class PretrainedModelConfig:
    """Which pretrained model, and optionally only its first blocks (a fast slice).

    Attributes:
        name: "smollm2", "minilm", "mobilenet_v2" or "efficientnet_lite0".
        num_layers: keep the first transformer layers of smollm2 / minilm (None: all).
        blocks_per_stage: keep at most this many blocks per stage of the CNNs
            (None: all).
    """

    name: Literal["smollm2", "minilm", "mobilenet_v2", "efficientnet_lite0"] = "smollm2"
    num_layers: int | None = bounded(None, ge=1)
    blocks_per_stage: int | None = bounded(None, ge=1)


@dataclasses.dataclass
class CompressDataConfig:
    """Calibration (also the healing data) and evaluation, always from disjoint sources.

    Text models: BBC News, evaluation from the `eval_categories`, calibration from the
    other categories. smollm2: `calibration` / `evaluation` windows of `seq_len` tokens;
    minilm: `calibration` windows of `seq_len` tokens, and `evaluation` paragraphs
    (truncated to `seq_len` tokens) to embed. CNNs: random crops of `image_size` pixels
    from disjoint photographs (`recipes.data.photo_split(seed=seed)`).
    `batch_size`: examples per forward pass when evaluating.

    Attributes:
        calibration: calibration (and healing) windows or crops.
        evaluation: evaluation windows, paragraphs or crops.
        seq_len: tokens per text window (minilm: the paragraphs' truncation).
        image_size: side of the CNNs' crops.
        eval_categories: BBC categories held out for evaluation.
        batch_size: examples per forward pass when evaluating.
        seed: seed of the windows, crops and photograph split.
    """

    calibration: int = bounded(128, gt=0)
    evaluation: int = bounded(32, gt=0)
    seq_len: int = bounded(256, ge=2)
    image_size: int = bounded(224, ge=8)
    eval_categories: tuple[str, ...] = ("entertainment", "tech")
    batch_size: int = bounded(8, gt=0)
    seed: int = 0


@dataclasses.dataclass
class CompressFactorizeConfig:
    """`rank`: "params:0.8" / "flops:0.8" (a `lowrank.Budget` over the `target` layers),
    or any other `lowrank` rank rule (an int, a fraction of full rank, "energy:0.9").
    `init`: a registered initializer; data-aware ones ("whitened", "nkp") read the
    calibration data. `target`: a regex of layer paths, "" for the model's default (the
    block linears of smollm2 / minilm; the pointwise convs and the classifier of the
    CNNs). `sequential`: fit the layers in running order on the factorized model's own
    inputs (see `lowrank.factorize`). `budget_by`: what a budget allocates ranks from
    (`lowrank.Budget(by=...)`: "auto" and "weights" the weight spectra; "data" the
    input-whitened spectra on the calibration data; "output" each truncation's
    estimated effect on the calibration output; "uniform" keeps the same fraction of
    every layer).

    Attributes:
        rank: the rank rule, as above.
        init: the initializer's registered name.
        target: the layer-path regex ("": the model's default).
        sequential: fit layers on the factorized model's own inputs.
        budget_by: "auto", "data", "output", "weights" or "uniform".
    """

    rank: int | float | str = "params:0.8"
    init: str = "whitened"
    target: str = ""
    sequential: bool = True
    budget_by: Literal["auto", "data", "output", "weights", "uniform"] = "auto"


@dataclasses.dataclass
class HealConfig:
    """Distillation from the dense model after factorizing, on the calibration data
    (`steps` 0: no healing). The loss is `recipes.distill.kd_loss` with `alpha` and
    `temperature` for the language model (labels: the next tokens) and the classifiers
    (labels: the dense model's top-1), and `cosine_distance_loss` on the last hidden
    states for the encoder. The optimizer is the config's `optim` section. The curve
    logs train losses every `log_every` steps and evaluates every `eval_every` steps
    (0: at the start and the end only). For the classifiers, `mixup` > 0 heals on
    mixtures λ·a + (1 - λ)·b of two crops, λ ~ Beta(mixup, mixup), which teacher and
    student both see: the "function matching" of Beyer et al. 2022 (arXiv:2106.05237),
    distillation on inputs beyond the few calibration photographs.

    Attributes:
        steps: healing steps (0: none).
        batch_size: examples per healing step.
        alpha: weight of the distillation term against the label term.
        temperature: softmax temperature of the distillation term.
        log_every: steps between logged train losses.
        eval_every: steps between evaluations (0: at the start and the end only).
        mixup: Beta parameter of the crop mixtures (0: none; classifiers only).
        train: "all" parameters, or the "factors" of the factorized layers only (the
            rest stays at its pretrained values).
    """

    steps: int = 0
    batch_size: int = bounded(8, gt=0)
    alpha: float = bounded(1.0, ge=0, le=1)
    temperature: float = bounded(1.0, gt=0)
    log_every: int = 10
    eval_every: int = 0
    mixup: float = bounded(0.0, ge=0)
    train: Literal["all", "factors"] = "all"


@dataclasses.dataclass
class GenerateConfig:
    """Greedy generation from `prompt`, dense next to compressed (language models).

    Attributes:
        prompt: the text to continue.
        max_new_tokens: tokens to generate (0: no generation).
    """

    prompt: str = "The best way to learn a new language is"
    max_new_tokens: int = 0


def _heal_optim() -> OptimConfig:
    return OptimConfig(name="adamw", lr=1e-5, weight_decay=0.0, grad_clip=1.0)


@dataclasses.dataclass
class CompressConfig:
    """A compress recipe: load a pretrained model, factorize it under a budget,
    evaluate, optionally heal, evaluate again and save (see recipes/compress.py).

    Attributes:
        name: the recipe's name.
        task: "compress_pretrained" (a pipeline of `recipes.run`).
        model: which pretrained model (and slice).
        data: calibration and evaluation data.
        factorize: budget, initializer and layers.
        heal: distillation from the dense model after factorizing.
        optim: the healing optimizer (AdamW at 1e-5, gradients clipped to norm 1).
        generate: greedy generation for language models.
        out_dir: output folder ("": out/<name>).
        seed: seed of the factorization's random parts and of the healing batches.
        progress: show progress bars.
    """

    name: str
    task: str = "compress_pretrained"
    model: PretrainedModelConfig = dataclasses.field(default_factory=PretrainedModelConfig)
    data: CompressDataConfig = dataclasses.field(default_factory=CompressDataConfig)
    factorize: CompressFactorizeConfig = dataclasses.field(default_factory=CompressFactorizeConfig)
    heal: HealConfig = dataclasses.field(default_factory=HealConfig)
    optim: OptimConfig = dataclasses.field(default_factory=_heal_optim)
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)
    out_dir: str = ""
    seed: int = 0
    progress: bool = True


def pretrained_config(
    model: str,
    *,
    batch_size: int,
    rank: str = "params:0.8",
    budget_by: str = "auto",
    max_new_tokens: int = 0,
    **data,
) -> CompressConfig:
    """The shipped `compress_<model>` recipe body: the whole pretrained `model`, the
    whitened init at `rank`, no healing (its batch is `batch_size` when turned on).

    Args:
        model: the `PretrainedModelConfig.name`.
        batch_size: the calibration, evaluation and healing batch size.
        rank: the `CompressFactorizeConfig.rank` budget.
        budget_by: what the budget allocates ranks from (`CompressFactorizeConfig.budget_by`).
        max_new_tokens: greedy generation after compressing (language models).
        **data: the other `CompressDataConfig` fields (calibration, evaluation, ...).

    Returns:
        The `CompressConfig` named `compress_<model>`.
    """
    return CompressConfig(
        name=f"compress_{model}",
        model=PretrainedModelConfig(name=model),
        data=CompressDataConfig(batch_size=batch_size, **data),
        factorize=CompressFactorizeConfig(rank=rank, init="whitened", budget_by=budget_by),
        heal=HealConfig(steps=0, batch_size=batch_size, alpha=1.0, temperature=1.0, log_every=10),
        generate=GenerateConfig(max_new_tokens=max_new_tokens),
    )


def uses_calibration(init: str) -> bool:
    """Whether `lowrank.factorize` takes calibration data for this registered init."""
    return lowrank.get_initializer(init).calibration != "never"


def _not_for(key: str, value, default, name: str, applies_to: tuple[str, ...]) -> None:
    if value != default:
        raise ConfigError(
            f"{key}={value!r} does not apply to model.name={name!r}, only to "
            f"{' / '.join(applies_to)}; unset it (default {default!r})."
        )


def _check_model(config: CompressConfig) -> None:
    m, d, name = config.model, config.data, config.model.name
    defaults = CompressDataConfig()
    if name in CLASSIFIERS:
        _not_for("model.num_layers", m.num_layers, None, name, LANGUAGE_MODELS + ENCODERS)
        for key in ("seq_len", "eval_categories"):
            value = getattr(d, key)
            _not_for(f"data.{key}", value, getattr(defaults, key), name, LANGUAGE_MODELS + ENCODERS)
        return
    _not_for("model.blocks_per_stage", m.blocks_per_stage, None, name, CLASSIFIERS)
    _not_for("data.image_size", d.image_size, defaults.image_size, name, CLASSIFIERS)
    top = _MAX_LAYERS[name]
    if m.num_layers is not None and m.num_layers > top:
        raise ConfigError(
            f"model.num_layers={m.num_layers}: {name} has {top} layers; use 1..{top} "
            "(or none for all of them)."
        )
    shortest = 3 if name in ENCODERS else 2  # [CLS] + text + [SEP]; one input, one target
    if d.seq_len < shortest:
        raise ConfigError(
            f"data.seq_len={d.seq_len} must be at least {shortest} tokens for {name}."
        )
    if name in ENCODERS and d.evaluation < 2:
        raise ConfigError(
            f"data.evaluation={d.evaluation}: nearest-neighbour agreement needs at least "
            "2 evaluation paragraphs."
        )


def check(config: CompressConfig) -> None:
    """Raise a `ConfigError` naming the key when `config` cannot run; cheap (no model
    is loaded). Rank rules other than budgets are checked against the model's layers
    right after loading."""
    if not isinstance(config, CompressConfig):
        raise ConfigError(
            f"task={config.task!r} needs a CompressConfig (recipes.compress), got "
            f"{type(config).__name__}."
        )
    _check_model(config)
    f, h, d = config.factorize, config.heal, config.data
    if isinstance(f.rank, str) and f.rank.startswith("stable"):
        raise ConfigError(
            f"factorize.rank={f.rank!r}: stable-rank rules are for training from scratch; "
            "use a budget such as params:0.8."
        )
    rule = _rank_rule(f.rank)  # budgets: "params:x" / "flops:x" with x in (0, 1]
    if f.init not in lowrank.available_initializers():
        raise ConfigError(
            f"factorize.init={f.init!r} is not a registered initializer; available: "
            f"{', '.join(lowrank.available_initializers())}."
        )
    if f.budget_by != "auto" and not isinstance(rule, lowrank.Budget):
        raise ConfigError(
            f"factorize.budget_by={f.budget_by!r} applies to budgets (factorize.rank="
            f"params:x or flops:x), not factorize.rank={f.rank!r}; unset it."
        )
    if f.budget_by in lowrank.Budget.DATA_AWARE and not uses_calibration(f.init):
        raise ConfigError(
            f"factorize.budget_by={f.budget_by!r} needs calibration data, which init "
            f"{f.init!r} does not read; choose init whitened or nkp, or budget_by weights."
        )
    if h.steps:
        if config.model.name not in CLASSIFIERS and h.batch_size > d.calibration:
            raise ConfigError(
                f"heal.batch_size={h.batch_size} exceeds data.calibration={d.calibration} "
                "(healing batches are drawn from the calibration windows); lower it or "
                "raise data.calibration."
            )
        if config.optim.warmup_steps > h.steps:
            raise ConfigError(
                f"optim.warmup_steps={config.optim.warmup_steps} exceeds heal.steps="
                f"{h.steps}; shorten the warm-up."
            )
    if h.mixup and config.model.name not in CLASSIFIERS:
        _not_for("heal.mixup", h.mixup, 0.0, config.model.name, CLASSIFIERS)
    if config.generate.max_new_tokens and config.model.name not in LANGUAGE_MODELS:
        name, tokens = config.model.name, config.generate.max_new_tokens
        _not_for("generate.max_new_tokens", tokens, 0, name, LANGUAGE_MODELS)
