"""Students of a byte-level teacher language model: build them, train them, score them.

A student is either the teacher factorized by `lowrank` under a parameter budget over
its attention projections and MLPs (factors initialized from the teacher's weights:
spectral, whitened or NKP with calibration text; embeddings stay dense), or a dense
`Transformer` of the teacher's depth, narrowed to a matching parameter count and
trained from scratch.

Training uses the shared trainer (`recipes.train.train`). The teacher rides in the
trainer's `state` slot, so it enters the jitted step as an argument, and every batch
carries its distillation weight `alpha` per example, so one compiled step serves:
"ce" (alpha 0, the teacher is never run), "kd" (alpha fixed), "salt" (KD for the first
n_kd steps, then CE; arXiv:2410.18779) and "salt_ds" (SALT whose KD phase trains on
the windows the teacher scores hard but learnable).

    python -m recipes.student shakespeare_teacher                 # dense teacher
    python -m recipes.student shakespeare_student --set distill.mode=salt
"""

import dataclasses
import functools
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

import lowrank

from ._report import seconds_in_turns
from .config import ConfigError
from .distill import kd_token_losses, salt_alpha, salt_ds_scores, select_hard_learnable
from .longcontext import likelihood_accuracy, make_list_tasks
from .models import BYTE_VOCAB, Transformer

FACTORIZE_TARGET = r"blocks\.\d+\.(attn\.(query|key|value|output)_proj|mlp\.fc[12])"
_MLP_IN = re.compile(r"blocks\.\d+\.mlp\.fc1")

Batch = dict[str, np.ndarray]


# ---------------------------------------------------------------- sizes and checks


def _count(tree) -> int:
    """Parameters of a pytree of arrays or of `jax.ShapeDtypeStruct`s."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def non_embedding_params(model: Transformer) -> int:
    """Parameters outside the token and position embeddings (blocks, final norm, head)."""
    return _count((model.blocks, model.ln_f, model.head))


def transformer_kwargs(model: Transformer) -> dict:
    """Constructor arguments that rebuild `model`'s dense skeleton (factorized or not)."""
    return dict(
        vocab_size=model.vocab_size,
        context=model.context,
        d_model=model.d_model,
        n_layers=model.n_layers,
        n_heads=model.n_heads,
        mlp_ratio=model.blocks[0].mlp.fc1.out_features // model.d_model,
        dropout=float(model.dropout.p),
        tie_embeddings=model.tie_embeddings,
        rotary=model.rotary,
    )


def check_context(model: Transformer, length: int, *, name: str = "length") -> None:
    """Raise unless windows of `length` tokens fit the model's context."""
    if length > model.context:
        raise ValueError(
            f"{name}={length} is longer than the model context {model.context}; "
            f"use {name} <= {model.context} or a model with a larger context"
        )


def check_vocab(teacher: Transformer, student: Transformer) -> None:
    """Raise unless teacher and student predict over the same tokens (KD compares them
    token by token) and that vocabulary covers the byte tokenizer."""
    if teacher.vocab_size != student.vocab_size:
        raise ValueError(
            f"teacher vocab_size={teacher.vocab_size} differs from student "
            f"vocab_size={student.vocab_size}; distillation needs one tokenizer: build the "
            f"student with vocab_size={teacher.vocab_size}"
        )
    if teacher.vocab_size < BYTE_VOCAB:
        raise ValueError(
            f"vocab_size={teacher.vocab_size} cannot hold the byte tokenizer's "
            f"{BYTE_VOCAB} ids; build the models with vocab_size={BYTE_VOCAB}"
        )


# ---------------------------------------------------------------- students


def _keep_only(plan: lowrank.Plan, paths: set[str]) -> lowrank.Plan:
    for lp in plan.factorized:
        if lp.path not in paths:
            plan = plan.with_rank(lp.path, None)
    return plan


def factorized_student(
    teacher: Transformer,
    *,
    params: float,
    init: str = "spectral",
    calibration: Int[Array, "n T"] | None = None,
    key: PRNGKeyArray,
) -> tuple[Transformer, lowrank.Plan]:
    """The teacher with its attention projections and MLPs factorized under
    `lowrank.Budget(params=params)` of those layers, and the plan (for `save_lm`).

    `init`: "spectral", "random", "whitened" (needs `calibration`, a batch of token
    windows), or "nkp": each MLP's first layer by NKP for its GELU (on `calibration`
    when given), then the other (linear) layers whitened on the model so far, or
    spectral without data.
    """
    if init not in ("spectral", "random", "whitened", "nkp"):
        raise ValueError(
            f"init={init!r} is not a student init; use 'spectral', 'whitened', 'nkp' or 'random'"
        )
    try:
        plan = lowrank.plan(teacher, rank=lowrank.Budget(params=params), target=FACTORIZE_TARGET)
    except ValueError as e:
        raise ValueError(f"student params={params}: {e}") from e
    if init in ("spectral", "random"):
        return lowrank.factorize(teacher, plan=plan, init=init, key=key, return_plan=True)
    if init == "whitened":
        return lowrank.factorize(
            teacher, plan=plan, init="whitened", calibration=calibration, key=key, return_plan=True
        )
    mlp_in = {lp.path for lp in plan.factorized if _MLP_IN.fullmatch(lp.path)}
    rest = {lp.path for lp in plan.factorized} - mlp_in
    k1, k2 = jr.split(key)
    model, first = lowrank.factorize(
        teacher,
        plan=_keep_only(plan, mlp_in),
        init=lowrank.NKP(activation=jax.nn.gelu),
        calibration=calibration,
        key=k1,
        return_plan=True,
    )
    model, second = lowrank.factorize(
        model,
        plan=_keep_only(plan, rest),
        init="spectral" if calibration is None else "whitened",
        calibration=calibration,
        key=k2,
        return_plan=True,
    )
    layers = [first[lp.path] if lp.path in mlp_in else second[lp.path] for lp in plan.layers]
    return model, dataclasses.replace(plan, layers=layers)


def dense_student(teacher: Transformer, *, params: float, key: PRNGKeyArray) -> Transformer:
    """A dense Transformer of the teacher's depth, heads, context and vocabulary whose
    width gives the non-embedding parameter count closest to `params` x the teacher's."""
    if not 0 < params <= 1:
        raise ValueError(f"student params={params} must be a fraction in (0, 1]")
    kwargs = transformer_kwargs(teacher)
    target = params * non_embedding_params(teacher)
    step = kwargs["n_heads"] * (2 if teacher.rotary else 1)

    def count(width: int) -> int:
        shapes = eqx.filter_eval_shape(Transformer, **{**kwargs, "d_model": width}, key=key)
        return non_embedding_params(shapes)

    counts = {w: count(w) for w in range(step, teacher.d_model + 1, step)}
    if counts[step] > target:
        raise ValueError(
            f"student params={params} cannot be met by a dense student: the narrowest one "
            f"(d_model={step}) already has {counts[step] / (target / params):.3f} of the "
            f"teacher's non-embedding parameters; raise params"
        )
    width = min(counts, key=lambda w: abs(counts[w] - target))
    return Transformer(**{**kwargs, "d_model": width}, key=key)


# ---------------------------------------------------------------- saving


def save_lm(path, model: Transformer, plan: lowrank.Plan | None = None) -> None:
    """Write `model` to `path` and its skeleton to `path + '.json'`; a factorized model
    also needs its plan (written by `lowrank.save` next to it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if plan is None:
        eqx.tree_serialise_leaves(path, model)
    else:
        lowrank.save(path, model, plan)
    meta = {"transformer": transformer_kwargs(model), "factorized": plan is not None}
    path.with_name(path.name + ".json").write_text(json.dumps(meta, indent=1) + "\n")


def load_lm(path) -> Transformer:
    """A model written by `save_lm`, in inference mode."""
    path = Path(path)
    meta_file = path.with_name(path.name + ".json")
    if not path.is_file() or not meta_file.is_file():
        raise FileNotFoundError(
            f"no saved model at {str(path)!r} (needs it and {meta_file.name}); train one "
            "first, e.g. python -m recipes.student shakespeare_teacher"
        )
    meta = json.loads(meta_file.read_text())
    skeleton = Transformer(**meta["transformer"], key=jr.key(0))
    if meta["factorized"]:
        model = lowrank.load(path, skeleton)
    else:
        model = eqx.tree_deserialise_leaves(path, skeleton)
    return eqx.nn.inference_mode(model)


# ---------------------------------------------------------------- distillation recipe


@dataclasses.dataclass
class DistillConfig:
    """How a student learns. `alpha`: KD weight (1 = pure distillation) while KD is on;
    `n_kd`: steps of KD before plain CE ("salt", "salt_ds"); `ds_pool` random training
    windows are scored by the teacher and the `ds_fraction` hardest learnable ones
    (true token in the teacher's top `ds_k`) feed the KD phase of "salt_ds"."""

    mode: Literal["ce", "kd", "salt", "salt_ds"] = "kd"
    alpha: float = 1.0
    temperature: float = 1.0
    n_kd: int = 100
    ds_pool: int = 1024
    ds_fraction: float = 0.5
    ds_k: int = 10


def check_distill(distill: DistillConfig, steps: int) -> None:
    """Raise a `ConfigError` naming the `distill.` key when the recipe cannot run."""
    if not 0.0 <= distill.alpha <= 1.0:
        raise ConfigError(f"distill.alpha={distill.alpha} must be in [0, 1].")
    if not distill.temperature > 0:
        raise ConfigError(f"distill.temperature={distill.temperature} must be > 0.")
    if distill.mode in ("salt", "salt_ds") and not 1 <= distill.n_kd <= steps:
        raise ConfigError(
            f"distill.n_kd={distill.n_kd} must be in [1, train.steps={steps}] for "
            f"distill.mode={distill.mode!r} (KD steps before plain next-token training)."
        )
    if distill.mode == "salt_ds":
        if not 0.0 < distill.ds_fraction <= 1.0:
            raise ConfigError(f"distill.ds_fraction={distill.ds_fraction} must be in (0, 1].")
        if not 1 <= distill.ds_k <= BYTE_VOCAB:
            raise ConfigError(f"distill.ds_k={distill.ds_k} must be in [1, {BYTE_VOCAB}].")
        if distill.ds_pool < 1:
            raise ConfigError(f"distill.ds_pool={distill.ds_pool} must be >= 1 window.")


def alpha_schedule(distill: DistillConfig) -> Callable[[int], float]:
    """The KD weight at each optimizer step under `distill.mode`."""
    if distill.mode == "ce":
        return lambda step: 0.0
    if distill.mode == "kd":
        return lambda step: distill.alpha
    return lambda step: float(salt_alpha(step, n_kd=distill.n_kd, alpha=distill.alpha))


# ---------------------------------------------------------------- data


def random_windows(
    data: np.ndarray, rng: np.random.Generator, batch_size: int, length: int
) -> Int[np.ndarray, "batch length_plus_1"]:
    """`batch_size` windows of `length + 1` tokens at uniform start positions."""
    if data.shape[0] < length + 1:
        raise ValueError(
            f"the text has {data.shape[0]} tokens, fewer than length + 1 = {length + 1}; "
            "use a shorter length or more text"
        )
    starts = rng.integers(0, data.shape[0] - length, size=batch_size)
    return np.asarray(data)[starts[:, None] + np.arange(length + 1)].astype(np.int32)


def train_batches(
    data: np.ndarray,
    *,
    batch_size: int,
    length: int,
    seed: int,
    alpha: Callable[[int], float] | None = None,
    hard: np.ndarray | None = None,
    hard_steps: int = 0,
) -> Callable[[int], Iterator[Batch]]:
    """`fn(step)` iterating over batches {"ids": (B, length + 1)} from global `step` on.

    Step s's batch depends only on (seed, s), so a resumed run sees the same batches.
    `alpha(step)` adds per-example KD weights {"alpha": (B,)}; for steps < `hard_steps`
    the windows are drawn from the rows of `hard` instead of the stream.
    """

    def batches(step: int) -> Iterator[Batch]:
        while True:
            rng = np.random.default_rng([seed, 1, step])
            if hard is not None and step < hard_steps:
                ids = hard[rng.integers(0, len(hard), size=batch_size)]
            else:
                ids = random_windows(data, rng, batch_size, length)
            batch = {"ids": ids}
            if alpha is not None:
                batch["alpha"] = np.full((batch_size,), alpha(step), np.float32)
            yield batch
            step += 1

    return batches


def eval_batches(windows: np.ndarray, batch_size: int) -> Callable[[], Iterator[Batch]]:
    """One pass over `windows` in batches; the last is padded and masked."""

    def batches() -> Iterator[Batch]:
        for i in range(0, len(windows), batch_size):
            ids = windows[i : i + batch_size]
            pad = batch_size - len(ids)
            mask = np.concatenate([np.ones(len(ids), np.float32), np.zeros(pad, np.float32)])
            yield {
                "ids": np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)]),
                "mask": mask,
            }

    return batches


@eqx.filter_jit
def _ds_scores(teacher, ids, k: int):
    return salt_ds_scores(jax.vmap(teacher)(ids[:, :-1]), ids[:, 1:], k=k)


def hard_learnable_windows(
    teacher: Transformer,
    data: np.ndarray,
    distill: DistillConfig,
    *,
    length: int,
    seed: int,
    batch_size: int = 64,
) -> Int[np.ndarray, "n length_plus_1"]:
    """SALT_DS: `distill.ds_pool` random windows scored by the teacher (`salt_ds_scores`),
    the `ds_fraction` with the highest median loss over learnable tokens kept."""
    pool = random_windows(data, np.random.default_rng([seed, 2]), distill.ds_pool, length)
    scores = np.concatenate(
        [
            np.asarray(_ds_scores(teacher, jnp.asarray(pool[i : i + batch_size]), distill.ds_k))
            for i in range(0, len(pool), batch_size)
        ]
    )
    keep = select_hard_learnable(scores, distill.ds_fraction)
    if len(keep) == 0:
        raise ValueError(
            "no training window has a token inside the teacher's top "
            f"distill.ds_k={distill.ds_k}; raise distill.ds_k or distill.ds_pool"
        )
    return pool[keep]


# ---------------------------------------------------------------- losses


def _apply(model, x, key):
    keys = jr.split(key, x.shape[0])
    return jax.vmap(lambda ids, k: model(ids, key=k))(x, keys)


def _token_ce(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def lm_loss(model, state, batch, key):
    """Next-token cross-entropy (nats per byte): the trainer's `loss_fn` for a dense LM."""
    ids = batch["ids"]
    loss = _token_ce(_apply(model, ids[:, :-1], key), ids[:, 1:]).mean()
    return loss, (state, {})


@functools.cache
def make_distill_loss(temperature: float):
    """The trainer's `loss_fn` for a student whose `state` is the teacher: per token
    (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T), alpha from the batch.
    The teacher runs only when some alpha > 0 (`lax.cond`), so CE phases cost no more
    than plain training. Cached per temperature, so runs share one compiled step."""

    def distill_loss(model, teacher, batch, key):
        ids, alpha = batch["ids"], batch["alpha"].astype(jnp.float32)
        x, y = ids[:, :-1], ids[:, 1:]
        logits = _apply(model, x, key).astype(jnp.float32)
        t_logits = jax.lax.cond(
            jnp.any(alpha > 0),
            lambda: jax.vmap(teacher)(x).astype(jnp.float32),
            lambda: jnp.zeros(logits.shape, jnp.float32),
        )
        losses = kd_token_losses(logits, t_logits, y, alpha=alpha[:, None], temperature=temperature)
        return losses.mean(), (teacher, {"ce": _token_ce(logits, y).mean(), "alpha": alpha.mean()})

    return distill_loss


def lm_eval(model, state, batch) -> dict[str, Float[Array, " batch"]]:
    """Per window: mean next-byte CE ("loss", nats), "bits_per_byte", and, when `state`
    is a teacher, "kl_to_teacher" (KL(teacher || model) per token, nats)."""
    ids = batch["ids"]
    x, y = ids[:, :-1], ids[:, 1:]
    logits = jax.vmap(model)(x).astype(jnp.float32)
    loss = _token_ce(logits, y).mean(axis=-1)
    out = {"loss": loss, "bits_per_byte": loss / math.log(2)}
    if state is not None:
        log_p = jax.nn.log_softmax(jax.vmap(state)(x).astype(jnp.float32), axis=-1)
        log_q = jax.nn.log_softmax(logits, axis=-1)
        out["kl_to_teacher"] = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1).mean(axis=-1)
    return out


def student_training(
    teacher: Transformer,
    student: Transformer,
    distill: DistillConfig,
    *,
    data: np.ndarray,
    batch_size: int,
    length: int,
    steps: int,
    seed: int,
):
    """(state, loss_fn, train_data) for `recipes.train.train` to train `student` under
    `distill`; the state is the teacher in inference mode. Checks come first."""
    check_vocab(teacher, student)
    check_context(student, length)
    check_context(teacher, length)
    check_distill(distill, steps)
    teacher = eqx.nn.inference_mode(teacher)
    hard, hard_steps = None, 0
    if distill.mode == "salt_ds":
        hard = hard_learnable_windows(teacher, data, distill, length=length, seed=seed)
        hard_steps = distill.n_kd
    stream = train_batches(
        data,
        batch_size=batch_size,
        length=length,
        seed=seed,
        alpha=alpha_schedule(distill),
        hard=hard,
        hard_steps=hard_steps,
    )
    return teacher, make_distill_loss(distill.temperature), stream


# ---------------------------------------------------------------- scoring


@eqx.filter_jit
def _summed_loss(model, batch):
    return jnp.sum(lm_eval(model, None, batch)["loss"] * batch["mask"])


def validation_loss(model, windows: np.ndarray, *, batch_size: int = 32) -> float:
    """Mean next-byte cross-entropy (nats) over `windows` (every window counts once)."""
    model = eqx.nn.inference_mode(model)
    total = sum(float(_summed_loss(model, b)) for b in eval_batches(windows, batch_size)())
    return total / len(windows)


def latent_list_accuracy(model: Transformer, *, n_tasks: int = 48, seed: int = 0):
    """(accuracy, tasks scored) on latent-list questions that fit the model's context,
    4-way multiple choice by likelihood (chance 0.25)."""
    tasks = make_list_tasks(4 * n_tasks, seed=seed, n_ops=3, n_distractors=2)
    longest = max(len(c) for t in tasks for c in t.candidates) + 1
    fit = [t for t in tasks if len(t.prompt.encode()) + longest <= model.context][:n_tasks]
    if not fit:
        raise ValueError(
            f"no latent-list task fits the model context {model.context}; "
            "use a model with a context of at least 128 bytes"
        )
    return likelihood_accuracy(eqx.nn.inference_mode(model), fit), len(fit)


@eqx.filter_jit
def _forward(model, ids):
    return jax.vmap(model)(ids)


def tokens_per_second(model, *, batch_size: int = 16, length: int = 128, repeats: int = 5) -> float:
    """Inference throughput: tokens scored per second by one jitted batched forward
    (`batch_size` windows of `length` bytes), median over `repeats` calls."""
    ids = jnp.zeros((batch_size, length), jnp.int32)
    model = eqx.nn.inference_mode(model)
    return (
        batch_size * length / seconds_in_turns(_forward, [model], ids, rounds=1, repeats=repeats)[0]
    )


def step_seconds(history: list[dict], batch_size: int) -> float:
    """Mean seconds per train step over the trainer's logging windows, the first (which
    holds the compile) left out when there are others; a mean, so a recipe whose phases
    cost differently (SALT: KD, then CE) is charged its average step."""
    rates = [r["examples_per_s"] for r in history if r["split"] == "train"]
    rates = rates[1:] if len(rates) > 1 else rates
    if not rates:
        raise ValueError("the history has no train records; set train.log_every > 0")
    return float(np.mean([batch_size / r for r in rates]))


def main(argv: list[str] | None = None) -> None:
    """`python -m recipes.student CONFIG [--set key=value ...]`: `recipes.run`'s command
    line for the text tasks only (train, save the model, score)."""
    from . import run  # run.py imports the text tasks, which import this module

    run.main(
        argv,
        prog="python -m recipes.student",
        tasks=("text_lm", "text_student"),
        description="Train a byte-level teacher or student.",
    )


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
