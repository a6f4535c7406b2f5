"""Run a recipe: `python -m recipes.run CONFIG [--set key=value ...]`.

CONFIG names a file in recipes/configs/ (or is a path to a .py file) whose `config()`
returns a `Config`; `--set` overrides any field by its dotted key. Bad keys and values
are reported before any compute. Outputs go to `train.out_dir` (default out/<name>):
config.json, metrics.jsonl, curves.png and checkpoints/ (a rerun resumes), and for
factorized runs report.json: params, FLOPs, inference and train step times against
the dense model, and the eval metrics around the factorization.
"""

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, PRNGKeyArray, PyTree
from tqdm.auto import tqdm

from . import compress, models
from ._factorize_policy import apply_policy, check_policy, check_rank
from ._hybrid import HybridWarmup
from ._report import factorization_report, format_report
from .config import Config, ConfigError, load_config
from .train import (
    Batch,
    EvalFn,
    LossFn,
    TrainResult,
    check_batch_size,
    default_mesh,
    make_optimizer,
    train,
)


class Task(NamedTuple):
    """Everything a recipe trains: model, state, losses and data streams."""

    model: PyTree
    state: PyTree
    loss_fn: LossFn
    eval_fn: EvalFn
    train_data: Callable[[int], Iterator[Batch]]
    eval_data: Callable[[], Iterable[Batch]]


def classification_loss(
    model: PyTree, state: PyTree, batch: Batch, key: PRNGKeyArray
) -> tuple[Array, tuple[PyTree, dict[str, Array]]]:
    """Mean softmax cross-entropy of `model` on a batch of images and integer labels;
    BatchNorm statistics are shared across the batch (the vmap axis)."""

    def apply(x, state, key):
        return model(x, state, key=key)

    keys = jax.random.split(key, len(batch["label"]))
    batched = jax.vmap(
        apply, axis_name=models.BATCH_AXIS, in_axes=(0, None, 0), out_axes=(0, None)
    )
    logits, state = batched(batch["image"], state, keys)
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, (state, {"accuracy": accuracy})


def classification_eval(model: PyTree, state: PyTree, batch: Batch) -> dict[str, Array]:
    """Per-example cross-entropy and top-1 correctness of an inference-mode model."""

    def apply(x):
        return model(x, state)[0]

    logits = jax.vmap(apply, axis_name=models.BATCH_AXIS)(batch["image"]).astype(jnp.float32)
    return {
        "loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]),
        "accuracy": (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32),
    }


def image_classification(config: Config) -> Task:
    """An image classifier from recipes.models on digits or a prepared TFDS dataset."""
    from . import data as image_data

    d, m = config.data, config.model
    dataset = image_data.image_dataset(
        d.name,
        image_size=d.image_size,
        data_dir=d.data_dir,
        train_split=d.train_split,
        eval_split=d.eval_split,
    )
    key = jax.random.key(config.train.seed)
    if m.name.startswith("resnet"):
        make = getattr(models, m.name)
        model, state = make(dataset.num_classes, stem=m.stem, width=m.width, key=key)
    else:
        model, state = models.efficientnet_b0(
            dataset.num_classes, dropout=m.dropout, stochastic_depth=m.stochastic_depth, key=key
        )
    return Task(
        model,
        state,
        classification_loss,
        classification_eval,
        image_data.train_batches(
            dataset,
            batch_size=d.batch_size,
            image_size=d.image_size,
            augment=d.augment,
            seed=config.train.seed,
            num_threads=d.num_threads,
        ),
        image_data.eval_batches(
            dataset,
            batch_size=d.eval_batch_size,
            image_size=d.image_size,
            augment=d.augment,
            num_threads=d.num_threads,
        ),
    )


TASKS: dict[str, Callable[[Config], Task]] = {"image_classification": image_classification}
"""Task builders by `Config.task`."""

PIPELINES: dict[str, Callable[[Any], Any]] = {"compress_pretrained": compress.compress}
"""Tasks that run their own steps around the trainer, by `Config.task`: compressing a
pretrained model (recipes/compress.py) factorizes, evaluates, heals through `train`
and saves; each returns a result with `.train` (a `TrainResult`) and `.report`."""


class RunResult(NamedTuple):
    """A finished recipe: the trainer's result and, for factorized runs, the report
    of recipes/_report.py (also written to `<out_dir>/report.json`)."""

    train: TrainResult
    report: dict[str, Any] | None


def _take(batches: Iterator[Batch], n: int) -> Batch:
    """The first `n` examples of a stream of batches, as one batch."""
    parts, count = [], 0
    while count < n:
        batch = next(batches)
        parts.append(batch)
        count += len(jax.tree.leaves(batch)[0])
    return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *parts)


def run(config: Config) -> RunResult:
    """Build the recipe's task, apply its factorization policy (before training, or
    after a dense warm-up), train it, and report dense against factorized."""
    if config.task in PIPELINES:
        return PIPELINES[config.task](config)
    if config.task not in TASKS:
        known = ", ".join([*TASKS, *PIPELINES])
        raise ConfigError(f"task={config.task!r} is unknown; available: {known}.")
    mesh = default_mesh()
    for key in ("batch_size", "eval_batch_size"):
        if hasattr(config.data, key):
            check_batch_size(getattr(config.data, key), mesh, f"data.{key}")
    check_policy(config)
    f = config.factorize
    optimizer, schedule = make_optimizer(
        config.optim, config.train.steps, frobenius_decay=f.frobenius_decay
    )
    train_config = config.train
    if not train_config.out_dir:
        train_config = dataclasses.replace(train_config, out_dir=str(Path("out") / config.name))
    task = TASKS[config.task](config)
    is_main = jax.process_index() == 0
    log = tqdm.write if is_main else lambda *_: None

    # Factorization: the policy decides which layers of the dense model become low-rank.
    # `example` runs one training example: lowrank reads conv output sizes off it.
    key, example = jax.random.key(config.train.seed), None
    if f.policy != "none":
        one = _take(task.train_data(0), 1)
        example = lambda m: task.loss_fn(m, task.state, one, key)  # noqa: E731
    check_rank(task.model, config, example=example)

    def factorize(model, state):
        calibration = None
        if f.calibration:  # this process's first training examples
            images = _take(task.train_data(0), f.calibration)
            calibration = lambda m: task.loss_fn(m, state, images, key)  # noqa: E731
        model, plan = apply_policy(
            model, config, example=example, calibration=calibration, initial=task.model,
            state=state,
        )  # fmt: skip
        log(f"factorized by policy {f.policy!r} (rank={f.rank!r}, init={f.init!r}):\n{plan}")
        return model, plan

    model, hooks = task.model, []
    if f.policy != "none" and f.warmup_steps == 0:
        model, _ = factorize(model, task.state)
    elif f.policy != "none":
        hooks.append(HybridWarmup(f.warmup_steps, factorize))

    if is_main:
        out_dir = Path(train_config.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(dataclasses.asdict(config), indent=2)
        (out_dir / "config.json").write_text(text + "\n")
    result = train(
        model,
        task.state,
        loss_fn=task.loss_fn,
        optimizer=optimizer,
        schedule=schedule,
        train_data=task.train_data,
        eval_fn=task.eval_fn,
        eval_data=task.eval_data,
        config=train_config,
        mesh=mesh,
        hooks=hooks,
    )
    if f.policy == "none" or not is_main:
        return RunResult(result, None)
    eval_batch = next(iter(task.eval_data()))
    report = factorization_report(
        task.model, result.model, result.state, eval_fn=task.eval_fn, eval_batch=eval_batch,
        example=example, history=result.history, batch_size=config.data.batch_size,
        factorized_at=f.warmup_steps,
    )  # fmt: skip
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    log(format_report(report, len(jax.tree.leaves(eval_batch)[0])))
    return RunResult(result, report)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument("config", help="a recipe in recipes/configs/ or a path to a .py config")
    parser.add_argument(
        "--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.steps=100 optim.lr=0.05",
    )
    args = parser.parse_args(argv)
    try:
        result = run(load_config(args.config, args.overrides))
    except (ConfigError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    last = {r["split"]: r for r in result.train.history}
    print(json.dumps(last))


if __name__ == "__main__":
    main(sys.argv[1:])
