"""Byte-level language-model recipes: a dense teacher, and its students.

Two tasks for the config system (`Config.task`):

- "text_lm": train a dense `Transformer` (model section `TextModelConfig`) with
  next-byte cross-entropy on the train works of a corpus split by work.
- "text_student": build a student of a saved teacher (model section
  `StudentModelConfig`) and train it under a `distill` section (`StudentRunConfig`).

`python -m recipes.student CONFIG [--set key=value]` builds the task, checks every
setting before any compute, trains with `recipes.train.train`, saves the model to
`<out_dir>/model.eqx` (`recipes.student.load_lm` reads it back) and prints a report:
validation loss and bits per byte on the unseen works, latent-list accuracy, inference
tokens/s and the train step time.
"""

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Literal

import equinox as eqx
import jax.random as jr
import numpy as np

from . import student as st
from .config import Config, ConfigError, load_config
from .models import Transformer
from .text import eval_windows, load_corpus
from .train import check_batch_size, default_mesh, make_optimizer, train


@dataclasses.dataclass
class TextModelConfig:
    """A dense byte-level `recipes.models.Transformer`."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    context: int = 128
    dropout: float = 0.0
    vocab_size: int = 256


@dataclasses.dataclass
class TextDataConfig:
    """Byte windows of `length` (+1) tokens from a corpus split by work: Shakespeare
    (`path` "") or every .txt under `path`. `eval_windows` caps validation windows."""

    path: str = ""
    edition: Literal["modern", "folio"] = "modern"
    val_fraction: float = 0.1
    length: int = 128
    batch_size: int = 16
    eval_batch_size: int = 32
    eval_windows: int = 256


@dataclasses.dataclass
class StudentModelConfig:
    """A student of the teacher saved at `teacher`: "factorized" by lowrank under
    `Budget(params=params)` of its attention and MLP layers (`init` from the teacher's
    weights; whitened and nkp read `calibration_windows` train windows), or "dense"
    from scratch at the same non-embedding parameter fraction."""

    teacher: str = "out/shakespeare_teacher/model.eqx"
    kind: Literal["factorized", "dense"] = "factorized"
    params: float = 0.25
    init: Literal["spectral", "whitened", "nkp", "random"] = "whitened"
    calibration_windows: int = 32


@dataclasses.dataclass
class StudentRunConfig(Config):
    """A `Config` with a `distill` section (how the student learns from the teacher)."""

    distill: st.DistillConfig = dataclasses.field(default_factory=st.DistillConfig)


@dataclasses.dataclass
class Built:
    """A text task ready to train, and what saving its model needs."""

    task: object  # recipes.run.Task
    plan: object  # lowrank.Plan of a factorized student, else None
    batch_size: int


def _corpus(data: TextDataConfig):
    if not 0.0 < data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={data.val_fraction} must be in (0, 1).")
    try:
        corpus = load_corpus(data.path or None, val_fraction=data.val_fraction,
                             edition=data.edition)  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"data.path={data.path!r}: {e}") from e
    for split in ("train", "validation"):
        if len(getattr(corpus, split)) < data.length + 1:
            raise ConfigError(
                f"the {split} text has {len(getattr(corpus, split))} bytes, fewer than "
                f"data.length + 1 = {data.length + 1}; lower data.length or add text."
            )
    return corpus


def _check_length(data: TextDataConfig, context: int, where: str) -> None:
    if data.length > context:
        raise ConfigError(
            f"data.length={data.length} is longer than the {where} context {context}; "
            f"set data.length <= {context} or train a model with a larger context."
        )


def _task(model, state, loss_fn, train_data, corpus, data: TextDataConfig):
    from .run import Task  # run.py registers these tasks: import it lazily

    windows = eval_windows(corpus.validation, data.length, max_windows=data.eval_windows)
    return Task(model, state, loss_fn, st.lm_eval, train_data,
                st.eval_batches(windows, data.eval_batch_size))  # fmt: skip


def build_text_lm(config: Config) -> Built:
    """The "text_lm" task: a dense Transformer trained with next-byte cross-entropy."""
    m, d = config.model, config.data
    _check_length(d, m.context, "model")
    if m.vocab_size < 256:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} cannot hold the byte tokenizer's 256 ids; "
            "set model.vocab_size=256."
        )
    corpus = _corpus(d)
    try:
        model = Transformer(vocab_size=m.vocab_size, context=m.context, d_model=m.d_model,
                            n_layers=m.n_layers, n_heads=m.n_heads, mlp_ratio=m.mlp_ratio,
                            dropout=m.dropout, key=jr.key(config.train.seed))  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"model: {e}") from e
    stream = st.train_batches(corpus.train, batch_size=d.batch_size, length=d.length,
                              seed=config.train.seed)  # fmt: skip
    return Built(_task(model, None, st.lm_loss, stream, corpus, d), None, d.batch_size)


def build_text_student(config: StudentRunConfig) -> Built:
    """The "text_student" task: a student of the saved teacher, trained under `distill`."""
    m, d, distill, seed = config.model, config.data, config.distill, config.train.seed
    if not 0 < m.params <= 1:
        raise ConfigError(f"model.params={m.params} must be a fraction in (0, 1].")
    st.check_distill(distill, config.train.steps)
    try:
        teacher = st.load_lm(m.teacher)
    except FileNotFoundError as e:
        raise ConfigError(f"model.teacher={m.teacher!r}: {e}") from e
    _check_length(d, teacher.context, "teacher")
    corpus = _corpus(d)
    key = jr.key(seed)
    try:
        if m.kind == "dense":
            student, plan = st.dense_student(teacher, params=m.params, key=key), None
        else:
            rng = np.random.default_rng([seed, 3])
            calibration = st.random_windows(corpus.train, rng, m.calibration_windows, d.length)
            student, plan = st.factorized_student(
                teacher, params=m.params, init=m.init, calibration=calibration[:, :-1], key=key
            )
    except ValueError as e:
        raise ConfigError(f"model.params={m.params}: {e}") from e
    student = eqx.nn.inference_mode(student, value=False)  # the teacher was loaded for inference
    state, loss_fn, stream = st.student_training(
        teacher, student, distill, data=corpus.train, batch_size=d.batch_size,
        length=d.length, steps=config.train.steps, seed=seed,
    )  # fmt: skip
    return Built(_task(student, state, loss_fn, stream, corpus, d), plan, d.batch_size)


BUILDERS = {"text_lm": build_text_lm, "text_student": build_text_student}


def text_lm(config: Config):
    """`recipes.run` task builder for "text_lm"."""
    return build_text_lm(config).task


def text_student(config: StudentRunConfig):
    """`recipes.run` task builder for "text_student"."""
    return build_text_student(config).task


TASKS = {"text_lm": text_lm, "text_student": text_student}
"""What `recipes.run.TASKS` needs to run these recipes (without saving the model)."""


def report(model, history: list[dict], batch_size: int, length: int) -> dict:
    """Validation loss / bits per byte (last eval), latent-list accuracy, inference
    tokens/s and the mean train step time."""
    last = [r for r in history if r["split"] == "eval"][-1]
    accuracy, n_tasks = st.latent_list_accuracy(model)
    return {
        "val_loss": last["loss"],
        "val_bits_per_byte": last["loss"] / math.log(2),
        **({"kl_to_teacher": last["kl_to_teacher"]} if "kl_to_teacher" in last else {}),
        "latent_list_accuracy": accuracy,
        "latent_list_tasks": n_tasks,
        "inference_tokens_per_s": st.tokens_per_second(model, length=length),
        "train_step_s": st.step_seconds(history, batch_size),
        "non_embedding_params": st.non_embedding_params(model),
    }


def run_text(config: Config) -> dict:
    """Build, train, save to `<out_dir>/model.eqx`, score; returns the report."""
    if config.task not in BUILDERS:
        raise ConfigError(f"task={config.task!r} is not a text task; use one of {list(BUILDERS)}.")
    mesh = default_mesh()
    for key in ("batch_size", "eval_batch_size"):
        check_batch_size(getattr(config.data, key), mesh, f"data.{key}")
    optimizer, schedule = make_optimizer(config.optim, config.train.steps)
    built = BUILDERS[config.task](config)
    train_config = config.train
    if not train_config.out_dir:
        train_config = dataclasses.replace(train_config, out_dir=str(Path("out") / config.name))
    out_dir = Path(train_config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    task = built.task
    result = train(task.model, task.state, loss_fn=task.loss_fn, optimizer=optimizer,
                   schedule=schedule, train_data=task.train_data, eval_fn=task.eval_fn,
                   eval_data=task.eval_data, config=train_config, mesh=mesh)  # fmt: skip
    st.save_lm(out_dir / "model.eqx", result.model, built.plan)
    scores = report(result.model, result.history, built.batch_size, config.data.length)
    (out_dir / "report.json").write_text(json.dumps(scores, indent=1) + "\n")
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.student", description="Train a byte-level teacher or student."
    )
    parser.add_argument("config", help="shakespeare_teacher, shakespeare_student, or a .py path")
    parser.add_argument(
        "--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.steps=100 distill.mode=salt",
    )
    args = parser.parse_args(argv)
    try:
        scores = run_text(load_config(args.config, args.overrides))
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")
    print(json.dumps(scores))
