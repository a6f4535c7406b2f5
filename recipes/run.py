"""Run a recipe: `python -m recipes.run CONFIG [--set key=value ...]`.

CONFIG names a file in recipes/configs/ (or is a path to a .py file) whose `config()`
returns a `Config`; `--set` overrides any field by its dotted key. Every task in `TASKS`
runs: image classification here, the byte-level text tasks of recipes/_text_task.py.
Bad keys and values are reported before any compute (one `error:` line, exit status 2);
a run whose loss becomes non-finite stops with exit status 1. Outputs go to
`train.out_dir` (default out/<name>): config.json, metrics.jsonl, curves.png and
checkpoints/ (a rerun resumes; the command says so, and when nothing was left to do),
and report.json: for factorized image runs params, FLOPs, inference and train step
times against the dense model and the eval metrics around the factorization; for text
tasks their scores (and the model, model.eqx). The command ends by listing them.
"""

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from . import _text_task
from ._factorize_policy import apply_policy, check_policy, check_rank
from ._hybrid import HybridWarmup
from ._image_task import classification_eval as classification_eval
from ._image_task import classification_loss as classification_loss
from ._image_task import image_classification
from ._report import factorization_report, format_report
from ._task import Task as Task
from ._train_history import write_atomic
from .config import Config, ConfigError, load_config
from .train import (
    Batch,
    TrainingDiverged,
    TrainResult,
    check_batch_size,
    default_mesh,
    make_optimizer,
    train,
)

TASKS: dict[str, Callable[[Config], Task]] = {
    "image_classification": image_classification,
    **_text_task.TASKS,
}
"""Task builders by `Config.task`."""


def _compress_pretrained(config):
    from .compress import compress  # imported when used: it loads the pretrained readers

    return compress(config)


PIPELINES: dict[str, Callable[[Any], Any]] = {"compress_pretrained": _compress_pretrained}
"""Tasks that run their own steps around the trainer, by `Config.task`: compressing a
pretrained model (recipes/compress.py) factorizes, evaluates, heals through `train`
and saves; each returns a result with `.train` (a `TrainResult`) and `.report`."""


class RunResult(NamedTuple):
    """A finished recipe.

    Attributes:
        train: the trainer's result (final model and state, history, resumed step).
        report: the report, also written to `<out_dir>/report.json`: the task's own
            (`Task.finish`), else for factorized runs dense against factorized
            (params, FLOPs, times, eval metrics), else None.
    """

    train: TrainResult
    report: dict[str, Any] | None


def out_dir(config: Config) -> Path:
    """Where a recipe writes: `train.out_dir`, or out/<config name> when it is "".

    Args:
        config: the recipe.

    Returns:
        The output folder.
    """
    return Path(config.train.out_dir or Path("out") / config.name)


def _take(batches: Iterator[Batch], n: int) -> Batch:
    """The first `n` examples of a stream of batches, as one batch."""
    parts, count = [], 0
    while count < n:
        batch = next(batches)
        parts.append(batch)
        count += len(jax.tree.leaves(batch)[0])
    return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *parts)


def _factorizer(config: Config, task, key, example, log):
    """`factorize(model, state) -> (model, plan)`: the recipe's policy applied to
    `model`, calibrated (when `factorize.calibration` > 0) on this process's first
    training examples."""
    f = config.factorize

    def factorize(model, state):
        calibration = None
        if f.calibration:  # this process's first training examples
            images = _take(task.train_data(0), f.calibration)
            calibration = lambda m: task.loss_fn(m, state, images, key)
        model, plan = apply_policy(
            model,
            config,
            example=example,
            calibration=calibration,
            initial=task.model,
            state=state,
        )
        log(f"factorized by policy {f.policy!r} (rank={f.rank!r}, init={f.init!r}):\n{plan}")
        return model, plan

    return factorize


def _report(config: Config, task, result: TrainResult, folder: Path, example, log) -> dict:
    """The task's own report (its `finish` hook), else dense against factorized on
    the first eval batch; logged."""
    if task.finish is not None:
        report = task.finish(result, folder)
        log(json.dumps(report))
        return report
    eval_batch = next(iter(task.eval_data()))
    report = factorization_report(
        task.model,
        result.model,
        result.state,
        eval_fn=task.eval_fn,
        eval_batch=eval_batch,
        example=example,
        history=result.history,
        batch_size=config.data.batch_size,
        factorized_at=config.factorize.warmup_steps,
    )
    log(format_report(report, len(jax.tree.leaves(eval_batch)[0])))
    return report


def run(config: Config) -> RunResult:
    """Build the recipe's task, apply its factorization policy (before training, or
    after a dense warm-up), train it, and report dense against factorized.

    Args:
        config: the recipe (task, model, data, optimizer, factorization, training).

    Returns:
        A `RunResult` (a pipeline task returns its own result).
    """
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
    train_config = dataclasses.replace(config.train, out_dir=str(out_dir(config)))
    task = TASKS[config.task](config)
    is_main = jax.process_index() == 0
    log = tqdm.write if is_main else lambda *_: None

    # Factorization: the policy decides which layers of the dense model become low-rank.
    # `example` runs one training example: lowrank reads conv output sizes off it.
    key, example = jax.random.key(config.train.seed), None
    if f.policy != "none":
        one = _take(task.train_data(0), 1)
        example = lambda m: task.loss_fn(m, task.state, one, key)
    check_rank(task.model, config, example=example)

    factorize = _factorizer(config, task, key, example, log)
    model, hooks = task.model, []
    if f.policy != "none" and f.warmup_steps == 0:
        model, _ = factorize(model, task.state)
    elif f.policy != "none":
        hooks.append(HybridWarmup(f.warmup_steps, factorize))

    folder = out_dir(config)
    if is_main:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(
            folder / "config.json", json.dumps(dataclasses.asdict(config), indent=2) + "\n"
        )
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
    if not is_main or (f.policy == "none" and task.finish is None):
        return RunResult(result, None)
    report = _report(config, task, result, folder, example, log)
    write_atomic(folder / "report.json", json.dumps(report, indent=1) + "\n")
    return RunResult(result, report)


def _summary(config: Config, result: TrainResult) -> str:
    """What a finished command tells the user: whether it resumed (and found nothing
    left to do), and where the outputs are."""
    folder, steps, resumed = out_dir(config), config.train.steps, result.resumed_from
    lines = []
    if resumed is not None and resumed >= steps:
        lines.append(
            f"resumed from the checkpoint at step {resumed} in {folder / 'checkpoints'}: "
            f"train.steps={steps} were already done, nothing left to train. To train again, "
            "set train.resume=false or another train.out_dir."
        )
    elif resumed is not None:
        lines.append(
            f"resumed from the checkpoint at step {resumed} in {folder / 'checkpoints'} "
            f"and trained steps {resumed + 1}-{steps}."
        )
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    lines.append(f"outputs in {folder}/: {', '.join(names)}")
    return "\n".join(lines)


def main(
    argv: list[str] | None = None,
    *,
    prog: str = "python -m recipes.run",
    description: str = __doc__.split("\n")[0],
    tasks: tuple[str, ...] | None = None,
) -> None:
    """The command line: run a recipe, print where its outputs went, then the last
    train and eval records as JSON. `tasks` limits which `Config.task`s it accepts
    (`python -m recipes.student` takes only the text tasks).

    Args:
        argv: the arguments (default sys.argv[1:]).
        prog: the program name in help and errors.
        description: the help text's first line.
        tasks: the accepted tasks, or None for all.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("config", help="a recipe in recipes/configs/ or a path to a .py config")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.steps=100 optim.lr=0.05",
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if tasks is not None and config.task not in tasks:
            raise ConfigError(
                f"task={config.task!r} is not one of {prog}'s tasks ({', '.join(tasks)}); "
                f"run it with python -m recipes.run {args.config}."
            )
        result = run(config)
    except (ConfigError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    except TrainingDiverged as e:
        parser.exit(1, f"error: {e}\n")
    if jax.process_index() == 0 and config.task not in PIPELINES:  # pipelines say it
        print(_summary(config, result.train))
    last = {r["split"]: r for r in result.train.history}
    print(json.dumps(last))


if __name__ == "__main__":
    main(sys.argv[1:])
