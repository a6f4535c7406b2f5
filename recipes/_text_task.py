"""Byte-level language-model recipes: a dense teacher, and its students.

Two tasks for the config system (`Config.task`):

- "text_lm": train a dense `Transformer` (model section `TextModelConfig`) with
  next-byte cross-entropy on the train works of a corpus split by work.
- "text_student": build a student of a saved teacher (model section
  `StudentModelConfig`) and train it under a `distill` section (`StudentRunConfig`).

The config sections live in the public `recipes.text_config`.

`recipes.run` registers both (`TASKS`): `python -m recipes.run CONFIG` (or
`python -m recipes.student CONFIG`, which takes only these tasks) checks every setting
before any compute, trains with `recipes.train.train`, saves the model to
`<out_dir>/model.eqx` (`recipes.student.load_lm` reads it back) and reports validation
loss and bits per byte on the unseen works, latent-list accuracy, inference tokens/s
and the train step time.
"""

import math
from pathlib import Path

import equinox as eqx
import jax.random as jr
import numpy as np

from . import student as st
from ._task import Task
from .config import Config, ConfigError
from .models import Transformer
from .text import eval_windows, load_corpus
from .text_config import StudentRunConfig, TextDataConfig
from .train import TrainResult


def _corpus(data: TextDataConfig):
    if not 0.0 < data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={data.val_fraction} must be in (0, 1).")
    try:
        corpus = load_corpus(
            data.path or None, val_fraction=data.val_fraction, edition=data.edition
        )
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


def _task(model, state, loss_fn, train_data, corpus, data: TextDataConfig, plan=None) -> Task:
    windows = eval_windows(corpus.validation, data.length, max_windows=data.eval_windows)

    def finish(result: TrainResult, out_dir: Path) -> dict:
        st.save_lm(out_dir / "model.eqx", result.model, plan)
        return report(result.model, result.history, data.batch_size, data.length)

    return Task(
        model,
        state,
        loss_fn,
        st.lm_eval,
        train_data,
        st.eval_batches(windows, data.eval_batch_size),
        finish,
    )


def build_text_lm(config: Config) -> Task:
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
        model = Transformer(
            vocab_size=m.vocab_size,
            context=m.context,
            d_model=m.d_model,
            n_layers=m.n_layers,
            n_heads=m.n_heads,
            mlp_ratio=m.mlp_ratio,
            dropout=m.dropout,
            key=jr.key(config.train.seed),
        )
    except ValueError as e:
        raise ConfigError(f"model: {e}") from e
    stream = st.train_batches(
        corpus.train, batch_size=d.batch_size, length=d.length, seed=config.train.seed
    )
    return _task(model, None, st.lm_loss, stream, corpus, d)


def build_text_student(config: StudentRunConfig) -> Task:
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
        teacher,
        student,
        distill,
        data=corpus.train,
        batch_size=d.batch_size,
        length=d.length,
        steps=config.train.steps,
        seed=seed,
    )
    return _task(student, state, loss_fn, stream, corpus, d, plan)


TASKS = {"text_lm": build_text_lm, "text_student": build_text_student}
"""The text task builders, by `Config.task`; `recipes.run.TASKS` includes them. Their
tasks' `finish` saves the model to `<out_dir>/model.eqx` and returns `report`."""


def report(model, history: list[dict], batch_size: int, length: int) -> dict:
    """Validation loss / bits per byte (last eval), latent-list accuracy (None when no
    task fits the model's context), inference tokens/s and the mean train step time."""
    last = [r for r in history if r["split"] == "eval"][-1]
    try:
        accuracy, n_tasks = st.latent_list_accuracy(model)
    except ValueError:  # a context too short for any latent-list question
        accuracy, n_tasks = None, 0
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
