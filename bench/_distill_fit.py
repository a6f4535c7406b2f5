"""bench/distill.py's training runs: the shared AdamW, `fit` through the shared
trainer, scoring a trained model into a table row, and inference throughput."""

import argparse
import dataclasses
import functools
import math
import statistics
import time

from recipes import student as st
from recipes.config import OptimConfig, TrainConfig
from recipes.train import make_optimizer, train


@functools.cache
def adamw(lr: float, steps: int, warmup: int):
    """AdamW (warm-up + cosine, clip 1); cached so runs of one shape share a compiled step."""
    optim = OptimConfig(name="adamw", lr=lr, weight_decay=0.01, warmup_steps=warmup, grad_clip=1.0)
    return make_optimizer(optim, steps)


def fit(model, state, loss_fn, stream, *, steps, lr, warmup, eval_data, log_every):
    """Train with `adamw` and return (model, history, seconds)."""
    optimizer, schedule = adamw(lr, steps, warmup)
    config = TrainConfig(steps=steps, log_every=log_every, eval_every=0, out_dir="", progress=False)
    start = time.perf_counter()
    result = train(
        model,
        state,
        loss_fn=loss_fn,
        optimizer=optimizer,
        schedule=schedule,
        train_data=stream,
        eval_fn=st.lm_eval,
        eval_data=eval_data,
        config=config,
    )
    return result.model, result.history, time.perf_counter() - start


def score(name, model, history, seconds, *, teacher_params, args, start_loss=None):
    last = [r for r in history if r["split"] == "eval"][-1]
    accuracy, n_tasks = st.latent_list_accuracy(model, n_tasks=args.list_tasks)
    row = {
        "model": name,
        "params": st.non_embedding_params(model) / teacher_params,
        "start_bpb": None if start_loss is None else start_loss / math.log(2),
        "val_loss": last["loss"],
        "val_bpb": last["loss"] / math.log(2),
        "kl": last.get("kl_to_teacher"),
        "list_acc": accuracy,
        "step_s": st.step_seconds(history, args.batch),
        "seconds": seconds,
    }
    print(
        {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()},
        f"(latent list: {n_tasks} tasks)",
        flush=True,
    )
    return {**row, "trained": model}


def throughputs(models: list, *, batch: int, length: int, rounds: int = 7) -> list[float]:
    """Inference tokens/s of each model, timed in alternating rounds (every model once
    per round, median over rounds) so that load drift on a shared machine hits all alike."""
    per_round = [
        [st.tokens_per_second(m, batch_size=batch, length=length, repeats=3) for m in models]
        for _ in range(rounds)
    ]
    return [statistics.median(r[i] for r in per_round) for i in range(len(models))]


@dataclasses.dataclass
class Bench:
    """One run's arguments, data and table rows, shared by its training runs."""

    args: argparse.Namespace
    corpus: object
    val: list
    eval_data: object
    rows: list = dataclasses.field(default_factory=list)
    teacher_params: float = 0.0

    @property
    def common(self) -> dict:
        return dict(batch_size=self.args.batch, length=self.args.length, seed=1)  # teacher: 0

    def fit_and_score(self, name, model, state, loss_fn, stream, *, steps, lr, warmup, **kw):
        """`fit`, then `score` the result into a new table row."""
        log_every = kw.pop("log_every", max(1, self.args.student_steps // 8))
        model, history, seconds = fit(
            model,
            state,
            loss_fn,
            stream,
            steps=steps,
            lr=lr,
            warmup=warmup,
            eval_data=self.eval_data,
            log_every=log_every,
        )
        self.add_row(name, model, history, seconds, **kw)

    def add_row(self, name, model, history, seconds, **kw):
        self.rows.append(
            score(
                name,
                model,
                history,
                seconds,
                teacher_params=self.teacher_params,
                args=self.args,
                **kw,
            )
        )
