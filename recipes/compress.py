"""Compress a pretrained model: `python -m recipes.run compress_smollm2 --set ...`.

The recipes compress_smollm2, compress_minilm, compress_mobilenet_v2 and
compress_efficientnet_lite0 (recipes/configs/) run `compress`:

1. load the pretrained model (optionally its first layers or blocks only) and its
   calibration and evaluation data, from disjoint articles or photographs;
2. plan ranks under the budget (`factorize.rank`, e.g. params:0.8 of the target
   layers) and factorize with `lowrank.factorize`, data-aware inits fitted on the
   calibration data;
3. evaluate dense and compressed on the evaluation data: perplexity and bits per byte
   (language model), KL to the dense model and top-1 agreement (classifiers), cosine
   similarity to the dense embeddings and nearest-neighbour agreement (encoder); and
   for all, parameters, FLOPs and the wall time of a forward pass;
4. with `heal.steps > 0`, distill the compressed model from the dense one on the
   calibration data through `recipes.train.train`, then evaluate again;
5. save the final model (`lowrank.save`: model.eqx and model.plan.json; read it
   back with `lowrank.load(path, dense_model)`), and print a before/after table, for
   the language model with greedy generations from `generate.prompt`.

Outputs in `out_dir` (default out/<name>): config.json, report.json, model.eqx and
model.plan.json, and after healing heal_metrics.jsonl and heal.png (the healing
curve). Healing keeps no checkpoints: a rerun starts over (the factorization is redone
anyway)."""

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import optax
from jaxtyping import PyTree
from tqdm.auto import tqdm

import lowrank

from ._compress_config import (
    CompressConfig,
    CompressDataConfig,
    CompressFactorizeConfig,
    GenerateConfig,
    HealConfig,
    PretrainedModelConfig,
    check,
    pretrained_config,
    uses_calibration,
)
from ._compress_report import format_table as format_table
from ._compress_report import generations, report_data
from ._compress_subject import Subject
from ._compress_text import Encoder, LanguageModel
from ._compress_vision import Classifier
from ._policy_ranks import _rank_rule
from ._train_history import write_atomic
from .config import ConfigError, TrainConfig
from .train import TrainResult, make_optimizer, plot_history, train

SUBJECTS: dict[str, type[Subject]] = {
    "smollm2": LanguageModel,
    "minilm": Encoder,
    "mobilenet_v2": Classifier,
    "efficientnet_lite0": Classifier,
}
"""The `Subject` class for each `model.name`."""


class CompressResult(NamedTuple):
    """A finished compress run.

    Attributes:
        train: the healing run (`train.history` is empty without healing;
            `train.model` is the final model either way).
        report: the report, also in `<out_dir>/report.json`: model, rank rule, init,
            target, budget, the plan's layer and parameter counts, the data sources,
            per model ("dense", "compressed", "healed") params, FLOPs and quality
            metrics, the wall times, and for language models the generations.
    """

    train: TrainResult
    report: dict[str, Any]


def _rank(config: CompressConfig, subject: Subject, target: str):
    """The lowrank rank rule of `factorize.rank` (a budget with `factorize.budget_by`),
    checked on the model's target layers: a rule the model cannot meet (or a target
    matching nothing) is a `ConfigError`. Only FLOP budgets trace the model (for its
    layers' output positions)."""
    f = config.factorize
    rule = _rank_rule(f.rank)
    if isinstance(rule, lowrank.Budget):
        rule = dataclasses.replace(rule, by=f.budget_by)
    flops = isinstance(rule, lowrank.Budget) and rule.kind == "flops"
    example = subject.example() if flops else None
    # the check plans without data: a data-aware budget is checked as a weights one
    data_aware = isinstance(rule, lowrank.Budget) and rule.by in lowrank.Budget.DATA_AWARE
    check = dataclasses.replace(rule, by="weights") if data_aware else rule
    try:
        lowrank.plan(subject.dense, rank=check, target=target, example=example)
    except (ValueError, TypeError) as e:
        keys = f"factorize.rank={f.rank!r}, factorize.target={target!r}"
        raise ConfigError(f"{keys} on {config.model.name}: {e}") from e
    return rule, example


def _factorize(subject: Subject, config: CompressConfig, rule, example, target: str):
    """The compressed model and its plan; calibrated inits (and a data-aware budget)
    read the calibration data."""
    f = config.factorize
    calibration = subject.calibration() if uses_calibration(f.init) else None
    return lowrank.factorize(
        subject.dense,
        rank=rule,
        target=target,
        init=f.init,
        calibration=calibration,
        sequential=f.sequential,
        example=example,
        activations=subject.activations(target),
        key=jax.random.key(config.seed),
        return_plan=True,
    )


class _Flops:
    """FLOPs of one example for the dense model and its factorized twins. The model is
    traced once, on the dense model, for how many output vectors each layer makes per
    example; a factorized layer makes as many as the dense one it replaces."""

    def __init__(self, subject: Subject):
        once = lowrank.summary(subject.dense)
        traced = lowrank.summary(subject.dense, example=subject.example())
        self.positions = {
            a.path: b.flops // a.flops for a, b in zip(once.layers, traced.layers) if a.flops
        }

    def __call__(self, model: PyTree) -> int:
        layers = lowrank.summary(model).layers
        return sum(self.positions.get(l.path, 1) * l.flops for l in layers)


def _measure(subject: Subject, model: PyTree, flops: _Flops) -> dict[str, Any]:
    """Parameters, FLOPs of one example and the subject's quality metrics."""
    params = lowrank.summary(model).total_params
    return {"params": params, "flops": flops(model), **subject.evaluate(model)}


def _heal(subject: Subject, config: CompressConfig, model: PyTree) -> TrainResult:
    """Distill `model` from the dense model through the one training loop. The trainer
    evaluates every `heal.eval_every` steps (and at the last); with 0 it does not, and
    the curve's end points come from the before/after measurements instead."""
    h = config.heal
    optimizer, schedule = make_optimizer(config.optim, h.steps)
    if h.train == "factors":
        if "train" not in jax.tree.leaves(_factors_trained(model)):
            raise ConfigError(
                "heal.train='factors', but no layer was factorized: nothing would heal; "
                "use heal.train=all or a budget that factorizes layers."
            )
        optimizer = optax.multi_transform(
            {"train": optimizer, "keep": optax.set_to_zero()}, _factors_trained
        )
    settings = TrainConfig(
        steps=h.steps,
        log_every=h.log_every,
        eval_every=h.eval_every,
        seed=config.seed,
        out_dir="",
        progress=config.progress,
    )
    evaluate = {"eval_fn": subject.heal_eval, "eval_data": subject.eval_batches}
    return train(
        model,
        (subject.dense, subject.state),
        loss_fn=subject.heal_loss,
        optimizer=optimizer,
        schedule=schedule,
        train_data=subject.heal_batches,
        config=settings,
        **(evaluate if h.eval_every else {}),
    )


def _factors_trained(params: PyTree) -> PyTree:
    """`heal.train="factors"`'s labels: "train" for the arrays of the factorized layers,
    "keep" for every other array."""
    factorized = lambda node: isinstance(node, (lowrank.LowRankLinear, lowrank.LowRankConv))
    label = lambda node: jax.tree.map(lambda _: "train", node) if factorized(node) else "keep"
    return jax.tree.map(label, params, is_leaf=factorized)


def _curve(subject: Subject, history: list[dict], before: dict, after: dict, steps: int):
    """The healing history with the unhealed model's metrics at step 0 and, when the
    trainer did not evaluate, the healed model's at the last step."""
    first = {"step": 0, "split": "eval", **subject.curve_point(before)}
    if any(r["split"] == "eval" for r in history):
        return [first, *history]
    return [first, *history, {"step": steps, "split": "eval", **subject.curve_point(after)}]


def _save_curve(history: list[dict[str, Any]], out_dir: Path) -> None:
    write_atomic(out_dir / "heal_metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    plot_history(history, out_dir / "heal.tmp.png")
    os.replace(out_dir / "heal.tmp.png", out_dir / "heal.png")


def compress(config: CompressConfig) -> CompressResult:
    """Load, factorize, evaluate, heal (`heal.steps > 0`), evaluate, save and report.

    Args:
        config: a `CompressConfig` (e.g. `recipes.load_config("compress_smollm2")`).

    Returns:
        A `CompressResult`: the healing run (its model is the final model) and the
        report, also written to `<out_dir>/report.json` and printed as a table.
    """
    check(config)
    out_dir = Path(config.out_dir or Path("out") / config.name)
    log, clock = tqdm.write, time.perf_counter()
    log(f"loading {config.model.name} and its calibration / evaluation data")
    subject = SUBJECTS[config.model.name](config)
    target = config.factorize.target or subject.target
    rule, example = _rank(config, subject, target)
    seconds = {"load": time.perf_counter() - clock}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "config.json", json.dumps(dataclasses.asdict(config), indent=2) + "\n")

    flops = _Flops(subject)
    measured = {"dense": _measure(subject, subject.dense, flops)}
    f = config.factorize
    log(f"factorizing: rank={f.rank!r}, init={f.init!r}, budget_by={f.budget_by!r}")
    clock = time.perf_counter()
    compressed, plan = _factorize(subject, config, rule, example, target)
    seconds["factorize"] = time.perf_counter() - clock
    log("\n".join(line for line in str(plan).splitlines() if line.startswith(("TOTAL", "budget"))))
    measured["compressed"] = _measure(subject, compressed, flops)
    models = {"dense": subject.dense, "compressed": compressed}
    result = TrainResult(compressed, None, [])
    if config.heal.steps:
        clock = time.perf_counter()
        result = _heal(subject, config, compressed)
        seconds["heal"] = time.perf_counter() - clock
        models["healed"] = result.model
        measured["healed"] = _measure(subject, result.model, flops)
        result.history[:] = _curve(
            subject, result.history, measured["compressed"], measured["healed"], config.heal.steps
        )
        _save_curve(result.history, out_dir)
    for name, t in zip(models, subject.forward_seconds(list(models.values()))):
        measured[name]["forward_ms"] = t * 1e3
    lowrank.save(out_dir / "model.eqx", result.model, plan)
    report = report_data(config, subject, target, plan, measured, seconds)
    report["generation"] = generations(subject, models)
    write_atomic(out_dir / "report.json", json.dumps(report, indent=1) + "\n")
    log(format_table(report))
    log(f"outputs in {out_dir}/: {', '.join(sorted(p.name for p in out_dir.iterdir()))}")
    return CompressResult(result, report)


__all__ = [
    "SUBJECTS",
    "CompressConfig",
    "CompressDataConfig",
    "CompressFactorizeConfig",
    "CompressResult",
    "GenerateConfig",
    "HealConfig",
    "PretrainedModelConfig",
    "compress",
    "format_table",
    "pretrained_config",
]
