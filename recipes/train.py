"""A generic data-parallel trainer for Equinox models.

The task supplies `loss_fn(model, state, batch, key) -> (loss, (state, metrics))` and
optionally `eval_fn(model, state, batch) -> {name: per-example values}`; the trainer
does the rest: one jitted step with the batch sharded over every device (params
replicated; BatchNorm statistics are global because its `pmean` runs over the sharded
vmap axis), optional bf16 compute over float32 master weights, a learning-rate
schedule indexed by the global step, periodic evaluation, orbax checkpoints that
resume to the identical next step, metrics as JSON lines, a progress bar, and a PNG of
the curves. Hooks run between steps and may replace the model (e.g. factorize it in
place) and ask for a fresh optimizer state. A run whose training loss becomes NaN or
infinite stops with `TrainingDiverged` (checked whenever the losses are fetched: at
every log and before every checkpoint, so no diverged state is saved). Multi-host: call
`jax.distributed.initialize()` first and let every process feed its own share of each
batch.
"""

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, PyTree
from tqdm.auto import tqdm

from ._optimizer import make_optimizer as make_optimizer
from ._train_checkpoints import Checkpoints
from ._train_history import plot_history as plot_history
from ._train_history import write_history
from ._train_step import (
    StepSpec,
    eval_step,
    put_global,
    train_step,
    trainable_params,
    unit_schedule,
)
from ._train_types import REPLACED as REPLACED
from ._train_types import Batch as Batch
from ._train_types import EvalFn as EvalFn
from ._train_types import Hook as Hook
from ._train_types import LossFn as LossFn
from ._train_types import TrainingDiverged as TrainingDiverged
from ._train_types import TrainResult as TrainResult
from ._train_types import TrainState as TrainState
from .config import ConfigError, TrainConfig


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "batch size") -> None:
    """Raise unless `batch_size` (global) splits evenly over the mesh's devices.

    Args:
        batch_size: the global batch size.
        mesh: the device mesh.
        name: the setting named in the error.
    """
    if batch_size % mesh.size:
        raise ConfigError(
            f"{name}={batch_size} does not split evenly over {mesh.size} devices; "
            f"use a multiple of {mesh.size}."
        )


def default_mesh() -> Mesh:
    """All devices of all processes on one data-parallel axis named "data".

    Returns:
        The mesh.
    """
    return Mesh(np.asarray(jax.devices()), ("data",))


class _Run:
    """One `train` call's bookkeeping: its output folder and checkpoints, the history
    (kept in memory and, on the main process, in metrics.jsonl), and evaluation."""

    def __init__(self, spec: StepSpec, config: TrainConfig, eval_data, mesh: Mesh):
        self.spec, self.config, self.eval_data, self.mesh = spec, config, eval_data, mesh
        self.is_main = jax.process_index() == 0
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        self.checkpoints = None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.checkpoints = Checkpoints(self.out_dir / "checkpoints", config.keep_checkpoints)
        self.history: list[dict[str, Any]] = []

    def evaluate(self, ts: TrainState) -> dict[str, float]:
        model = eqx.nn.inference_mode(ts.model)
        totals, count = None, 0.0
        for batch in self.eval_data():
            sums, n = eval_step(
                self.spec, model, ts.state, put_global(batch, self.spec.batch_sharding)
            )
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            count = count + n
        totals, count = jax.device_get((totals, count))
        return {k: float(v) / float(count) for k, v in totals.items()}

    def fresh_opt_state(self, ts: TrainState) -> TrainState:
        opt_state = self.spec.optimizer.init(trainable_params(ts.model))
        return ts._replace(opt_state=put_global(opt_state, self.spec.replicated))

    def resume(self, ts: TrainState, hooks: Sequence[Hook]) -> tuple[TrainState, int | None]:
        """`ts` from the latest checkpoint (with the history up to it) when resuming,
        else with a fresh optimizer state; and the step resumed from (or None)."""
        checkpoints = self.checkpoints
        latest = checkpoints.latest() if checkpoints is not None and self.config.resume else None
        if latest is None:
            return self.fresh_opt_state(ts), None
        meta = checkpoints.meta(latest)
        ts = ts._replace(step=latest)
        for hook, saved in zip(hooks, meta["hooks"]):
            if hasattr(hook, "restore"):
                try:
                    ts = hook.restore(ts, saved)
                except ValueError as e:
                    raise checkpoints.mismatch(
                        latest, f"its {type(hook).__name__} state does not fit this model ({e})"
                    ) from e
        ts = checkpoints.restore(self.fresh_opt_state(ts), self.spec.replicated, meta)
        if (self.out_dir / "metrics.jsonl").exists():
            lines = (self.out_dir / "metrics.jsonl").read_text().splitlines()
            self.history = [
                r
                for r in map(json.loads, lines)
                if r["step"] < latest or (r["step"] == latest and "event" not in r)
            ]
        return ts, latest

    def record(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        if self.is_main and self.out_dir is not None:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    def due(self, every: int, step: int) -> bool:
        return step == self.config.steps or (every > 0 and step % every == 0)

    def run_hooks(self, ts: TrainState, hooks: Sequence[Hook]) -> TrainState:
        """`ts` after every hook; a replaced model is placed on the devices (and, with
        an eval_fn, evaluated before and after), and a dropped opt_state made afresh."""
        for hook in hooks:
            before = ts
            ts = hook(ts)
            if ts.model is not before.model:
                placed = put_global((ts.model, ts.state), self.spec.replicated)
                ts = ts._replace(model=placed[0], state=placed[1])
                if self.spec.eval_fn is not None:
                    step = ts.step
                    if not any(r["step"] == step and r["split"] == "eval" for r in self.history):
                        self.record({"step": step, "split": "eval", **self.evaluate(before)})
                    self.record(
                        {"step": step, "split": "eval", "event": REPLACED, **self.evaluate(ts)}
                    )
            if ts.opt_state is None:
                ts = self.fresh_opt_state(ts)
        return ts

    def finite(self, pending: list[dict[str, Array]], last_step: int) -> list[dict[str, Any]]:
        """The pending steps' metrics on the host; `TrainingDiverged` at a non-finite loss."""
        fetched = jax.device_get(pending)
        for step, metrics in enumerate(fetched, start=last_step - len(fetched) + 1):
            if not np.isfinite(metrics["loss"]):
                record = {k: float(v) for k, v in metrics.items()}
                self.record({"step": step, "split": "train", **record})
                saved = self.checkpoints.latest() if self.checkpoints is not None else None
                raise TrainingDiverged(
                    f"training diverged: the loss is {float(metrics['loss'])} at step {step}. "
                    "Lower optim.lr, clip the gradients (optim.grad_clip=1.0), train in fp32 "
                    "(train.precision=fp32) or check the data"
                    + (f"; the last checkpoint is from step {saved}." if saved else ".")
                )
        return fetched

    def loop(self, ts: TrainState, hooks: Sequence[Hook], train_data) -> TrainState:
        """Train from `ts.step` to `config.steps`: hooks, a step, then what is due
        (logging, evaluation, checkpoints)."""
        config, checkpoints = self.config, self.checkpoints
        base_key = jax.random.key(config.seed)
        batches = train_data(ts.step)
        pending: list[dict[str, Array]] = []  # this logging window's metrics, on device
        window: list[dict[str, Any]] = []  # ... and those already fetched and checked
        examples, tick = 0, time.perf_counter()
        show = config.progress and self.is_main
        bar = tqdm(total=config.steps, initial=ts.step, unit="step", disable=not show)
        try:
            while ts.step < config.steps:
                ts = self.run_hooks(ts, hooks)
                local = next(batches)
                batch_size = len(jax.tree.leaves(local)[0]) * jax.process_count()
                check_batch_size(batch_size, self.mesh)
                key = jax.random.fold_in(base_key, ts.step)
                batch = put_global(local, self.spec.batch_sharding)
                (model, state, opt_state), metrics = train_step(
                    self.spec, ts.model, ts.state, ts.opt_state, batch, key, jnp.asarray(ts.step)
                )
                ts = TrainState(ts.step + 1, model, state, opt_state)
                pending.append(metrics)
                examples += batch_size
                bar.update(1)
                log = self.due(config.log_every, ts.step)
                if log or (checkpoints is not None and self.due(config.checkpoint_every, ts.step)):
                    window, pending = window + self.finite(pending, ts.step), []
                if log:
                    means = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
                    rate = examples / (time.perf_counter() - tick)
                    self.record(
                        {"step": ts.step, "split": "train", **means, "examples_per_s": rate}
                    )
                    bar.set_postfix(loss=f"{means['loss']:.4f}", ex_per_s=f"{rate:.3g}")
                    window, examples, tick = [], 0, time.perf_counter()
                if self.spec.eval_fn is not None and self.due(config.eval_every, ts.step):
                    self.record({"step": ts.step, "split": "eval", **self.evaluate(ts)})
                if checkpoints is not None and self.due(config.checkpoint_every, ts.step):
                    saved = [getattr(hook, "checkpoint", lambda: None)() for hook in hooks]
                    checkpoints.save(ts, {"step": ts.step, "hooks": saved})
                if examples == 0:  # just logged: time the next window from here
                    tick = time.perf_counter()
        finally:
            bar.close()
            if checkpoints is not None:
                checkpoints.close()
        return ts


def train(
    model: PyTree,
    state: PyTree,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    train_data: Callable[[int], Iterator[Batch]],
    config: TrainConfig,
    schedule: optax.Schedule | None = None,
    eval_fn: EvalFn | None = None,
    eval_data: Callable[[], Iterable[Batch]] | None = None,
    hooks: Sequence[Hook] = (),
    mesh: Mesh | None = None,
) -> TrainResult:
    """Train for `config.steps` steps and return the final model, state and history.

    `train_data(step)` iterates over this process's share of the batches from global
    step `step` on (the same batches for the same step, so resumption is exact);
    `eval_data()` iterates once over eval batches, which may carry a "mask" (1 real,
    0 padding). `eval_fn` sees the model in inference mode. Updates are multiplied by
    `schedule(step)` (default 1). `config.out_dir` "" keeps nothing on disk; otherwise it
    receives metrics.jsonl, curves.png and checkpoints/ (resumed when `config.resume`).

    Args:
        model: the model to train (not mutated).
        state: its state (e.g. BatchNorm statistics, a teacher), or None.
        loss_fn: `(model, state, batch, key) -> (loss, (state, metrics))`.
        optimizer: a unit-learning-rate optax optimizer (`make_optimizer`).
        train_data: step -> iterator over batches from that step on.
        config: steps, logging, evaluation, checkpoints, precision, seed.
        schedule: step -> learning rate (default 1).
        eval_fn: `(model, state, batch) -> {name: per-example values}`, or None.
        eval_data: () -> iterable of eval batches, or None (with eval_fn).
        hooks: `Hook`s run before every step.
        mesh: the device mesh (default all devices on one "data" axis).

    Returns:
        A `TrainResult`: the final model and state, the history and the step resumed from.
    """
    if (eval_fn is None) != (eval_data is None):
        raise ValueError("pass eval_fn and eval_data together (or neither).")
    mesh = default_mesh() if mesh is None else mesh
    spec = StepSpec(
        loss_fn,
        eval_fn,
        optimizer,
        unit_schedule if schedule is None else schedule,
        jnp.bfloat16 if config.precision == "bf16" else None,
        NamedSharding(mesh, PartitionSpec()),
        NamedSharding(mesh, PartitionSpec("data")),
    )
    run = _Run(spec, config, eval_data, mesh)
    ts = TrainState(0, put_global(model, spec.replicated), put_global(state, spec.replicated), None)
    ts, latest = run.resume(ts, hooks)
    if run.is_main and run.out_dir is not None:
        write_history(run.out_dir / "metrics.jsonl", run.history)
    ts = run.loop(ts, hooks, train_data)
    if run.is_main and run.out_dir is not None:
        plot_history(run.history, run.out_dir / "curves.png")
    return TrainResult(ts.model, ts.state, run.history, latest)
