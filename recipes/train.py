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

import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, PRNGKeyArray, PyTree
from tqdm.auto import tqdm

from . import _frobenius_decay
from .config import ConfigError, OptimConfig, TrainConfig

Batch = dict[str, Any]
LossFn = Callable[
    [PyTree, PyTree, Batch, PRNGKeyArray], tuple[Array, tuple[PyTree, dict[str, Array]]]
]
EvalFn = Callable[[PyTree, PyTree, Batch], dict[str, Array]]


REPLACED = "model replaced"
"""The `event` of the eval record made right after a hook replaced the model."""


class TrainState(NamedTuple):
    """What the trainer carries from step to step. `step` counts updates done."""

    step: int
    model: PyTree
    state: PyTree
    opt_state: optax.OptState | None


class Hook(Protocol):
    """Called before every step with the current `TrainState`; returns it, possibly
    with another model. Return `opt_state=None` to get a freshly initialized one.
    When the model is replaced and evaluation is on, the trainer evaluates the model
    before (unless this step was just evaluated) and after, the latter recorded with
    `"event": REPLACED`.

    A hook that changes the model's structure must also survive resumption: define
    `checkpoint() -> dict` (JSON, saved with every checkpoint) and
    `restore(ts, saved) -> TrainState`, which gets the freshly built state at the
    checkpoint's step and returns it with that step's structure (values are then
    loaded from the checkpoint).
    """

    def __call__(self, ts: TrainState) -> TrainState: ...


@dataclasses.dataclass
class TrainResult:
    """The trained model and state, the history (metrics.jsonl's records), and the
    step the run resumed from (None for a fresh start; `config.steps` when a rerun
    found the run finished and had nothing left to do)."""

    model: PyTree
    state: PyTree
    history: list[dict[str, Any]]
    resumed_from: int | None = None


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the message says at which step and
    what to change."""


def make_optimizer(
    config: OptimConfig, total_steps: int, *, frobenius_decay: float | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """A unit-learning-rate optimizer and the schedule the trainer multiplies its
    updates by. Keeping the schedule outside the optimizer state lets a hook
    re-initialize the optimizer (new parameter shapes) without restarting the schedule.
    SGD decays weights PyTorch-style (added to the gradient); AdamW decoupled.
    `frobenius_decay` (a coefficient) decays the factors of low-rank layers through
    their product u @ v instead (see recipes/_frobenius_decay.py)."""
    if config.warmup_steps > total_steps:
        raise ConfigError(
            f"optim.warmup_steps={config.warmup_steps} exceeds train.steps={total_steps}; "
            "shorten the warm-up."
        )
    if config.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, config.lr, config.warmup_steps, max(total_steps, config.warmup_steps + 1)
        )
    else:
        schedule = optax.join_schedules(
            [
                optax.linear_schedule(0.0, config.lr, config.warmup_steps),
                optax.constant_schedule(config.lr),
            ],
            [config.warmup_steps],
        )
    decay = [optax.add_decayed_weights(config.weight_decay)]
    if frobenius_decay is not None:
        decay = [
            optax.add_decayed_weights(config.weight_decay, mask=_frobenius_decay.not_factors),
            _frobenius_decay.frobenius_decay(frobenius_decay),
        ]
    if config.name == "sgd":
        parts = [*decay, optax.trace(decay=config.momentum, nesterov=config.nesterov)]
    else:
        parts = [optax.scale_by_adam(), *decay]
    if config.grad_clip is not None:
        parts.insert(0, optax.clip_by_global_norm(config.grad_clip))
    return optax.chain(*parts, optax.scale(-1.0)), schedule


def _unit_schedule(step):
    return 1.0


def _cast(tree: PyTree, dtype) -> PyTree:
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)


def _put(tree: PyTree, sharding: NamedSharding) -> PyTree:
    """Place this process's arrays as global arrays (works single- and multi-host)."""

    def put(x):
        if not eqx.is_array(x) or (isinstance(x, jax.Array) and x.sharding == sharding):
            return x
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, tree)


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "batch size") -> None:
    """Raise unless `batch_size` (global) splits evenly over the mesh's devices."""
    if batch_size % mesh.size:
        raise ConfigError(
            f"{name}={batch_size} does not split evenly over {mesh.size} devices; "
            f"use a multiple of {mesh.size}."
        )


def default_mesh() -> Mesh:
    """All devices of all processes on one data-parallel axis named "data"."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in history))


def plot_history(history: Sequence[dict[str, Any]], path: Path) -> None:
    """One panel per metric, train and eval curves against the step, as a PNG."""
    from matplotlib.figure import Figure

    skip = {"step", "split", "time", "examples_per_s", "event"}
    names = sorted({k for r in history for k in r if k not in skip})
    if not names:
        return
    figure = Figure(figsize=(4 * len(names), 3.2))
    figure.subplots_adjust(left=0.08, right=0.97, bottom=0.16, top=0.88, wspace=0.3)
    for ax, name in zip(figure.subplots(1, len(names), squeeze=False)[0], names):
        for split in ("train", "eval"):
            points = [(r["step"], r[name]) for r in history if r["split"] == split and name in r]
            if points:
                ax.plot(*zip(*points), marker="." if split == "eval" else None, label=split)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend()
    figure.savefig(path, dpi=100)


_PARTS = ("model", "state", "opt_state")


def _array_signature(ts: TrainState) -> list[list[str]]:
    """[path, "dtype[shape]"] of every array a checkpoint of `ts` holds, in order."""
    arrays = eqx.filter((ts.model, ts.state, ts.opt_state), eqx.is_array)
    return [
        [_PARTS[path[0].idx] + jax.tree_util.keystr(path[1:]), f"{x.dtype}{list(x.shape)}"]
        for path, x in jax.tree_util.tree_leaves_with_path(arrays)
    ]


def _signature_mismatch(saved: list[list[str]], here: list[list[str]]) -> str | None:
    """How the arrays of a checkpoint differ from those of this run, or None."""
    for (saved_path, saved_type), (path, kind) in zip(saved, here):
        if (saved_path, saved_type) != (path, kind):
            return f"the checkpoint has {saved_path} {saved_type} where this run has {path} {kind}"
    if len(saved) != len(here):
        return f"the checkpoint holds {len(saved)} arrays, this run {len(here)}"
    return None


class _Checkpoints:
    """orbax checkpoints of (model, state, opt_state) arrays plus JSON metadata (which
    also lists the arrays, so resuming another model's checkpoint says what differs)."""

    def __init__(self, directory: Path, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            directory.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=max(1, keep))
        )

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, ts: TrainState, meta: dict[str, Any]) -> None:
        leaves = jax.tree.leaves(eqx.filter((ts.model, ts.state, ts.opt_state), eqx.is_array))
        meta = {**meta, "arrays": _array_signature(ts)}
        args = self._ocp.args
        self.manager.save(
            ts.step, args=args.Composite(arrays=args.StandardSave(leaves), meta=args.JsonSave(meta))
        )

    def mismatch(self, step: int, why: str) -> ConfigError:
        """The error for a checkpoint at `step` that is not this run's, saying `why`."""
        return ConfigError(
            f"train.out_dir holds a checkpoint of another run: at step {step} in "
            f"{self.manager.directory}, {why}; set train.out_dir to a fresh folder, or "
            "train.resume=false to train from scratch there."
        )

    def meta(self, step: int) -> dict[str, Any]:
        args = self._ocp.args
        return self.manager.restore(step, args=args.Composite(meta=args.JsonRestore()))["meta"]

    def restore(self, ts: TrainState, sharding: NamedSharding, meta: dict[str, Any]) -> TrainState:
        """`ts` with the arrays of the checkpoint at `ts.step` (whose metadata is `meta`);
        a `ConfigError` if they are not this run's arrays."""
        saved = meta.get("arrays")
        why = None if saved is None else _signature_mismatch(saved, _array_signature(ts))
        if why is not None:
            raise self.mismatch(ts.step, why)
        arrays, static = eqx.partition((ts.model, ts.state, ts.opt_state), eqx.is_array)
        leaves, treedef = jax.tree.flatten(arrays)
        target = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) for x in leaves]
        args = self._ocp.args
        try:
            restored = self.manager.restore(
                ts.step, args=args.Composite(arrays=args.StandardRestore(target))
            )["arrays"]
        except Exception as e:  # a checkpoint written before the array list was kept
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise self.mismatch(ts.step, f"its arrays do not fit this run ({first_line})") from e
        model, state, opt_state = eqx.combine(jax.tree.unflatten(treedef, restored), static)
        return TrainState(ts.step, model, state, opt_state)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _params(model: PyTree) -> PyTree:
    return eqx.filter(model, eqx.is_inexact_array)


@dataclasses.dataclass(frozen=True)
class _Step:
    """The static half of a train/eval step; equal specs share one compiled step."""

    loss_fn: LossFn | None
    eval_fn: EvalFn | None
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    compute_dtype: Any
    replicated: NamedSharding
    batch_sharding: NamedSharding


@eqx.filter_jit
def _train_step(spec: _Step, model, state, opt_state, batch, key, step):
    model, state, opt_state = eqx.filter_shard((model, state, opt_state), spec.replicated)
    batch = eqx.filter_shard(batch, spec.batch_sharding)

    def compute_loss(model):
        loss, (new_state, metrics) = spec.loss_fn(
            _cast(model, spec.compute_dtype), state, _cast(batch, spec.compute_dtype), key
        )
        return loss.astype(jnp.float32), (new_state, metrics)

    (loss, (state, metrics)), grads = eqx.filter_value_and_grad(compute_loss, has_aux=True)(model)
    updates, opt_state = spec.optimizer.update(grads, opt_state, _params(model))
    lr = spec.schedule(step)
    model = eqx.apply_updates(model, jax.tree.map(lambda u: lr * u, updates))
    metrics = {"loss": loss, **{k: v.astype(jnp.float32) for k, v in metrics.items()}, "lr": lr}
    return eqx.filter_shard((model, state, opt_state), spec.replicated), metrics


@eqx.filter_jit
def _eval_step(spec: _Step, model, state, batch):
    batch = eqx.filter_shard(batch, spec.batch_sharding)
    model, cast_batch = _cast((model, batch), spec.compute_dtype)
    metrics = spec.eval_fn(model, state, cast_batch)
    mask = batch.get("mask", jnp.ones(len(jax.tree.leaves(batch)[0])))
    sums = {k: jnp.sum(v.astype(jnp.float32) * mask) for k, v in metrics.items()}
    return sums, jnp.sum(mask)


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
    """
    if (eval_fn is None) != (eval_data is None):
        raise ValueError("pass eval_fn and eval_data together (or neither).")
    mesh = default_mesh() if mesh is None else mesh
    spec = _Step(
        loss_fn,
        eval_fn,
        optimizer,
        _unit_schedule if schedule is None else schedule,
        jnp.bfloat16 if config.precision == "bf16" else None,
        NamedSharding(mesh, PartitionSpec()),
        NamedSharding(mesh, PartitionSpec("data")),
    )
    replicated, batch_sharding = spec.replicated, spec.batch_sharding
    is_main = jax.process_index() == 0
    out_dir = Path(config.out_dir) if config.out_dir else None
    checkpoints = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoints = _Checkpoints(out_dir / "checkpoints", config.keep_checkpoints)

    def evaluate(ts: TrainState) -> dict[str, float]:
        model = eqx.nn.inference_mode(ts.model)
        totals, count = None, 0.0
        for batch in eval_data():
            sums, n = _eval_step(spec, model, ts.state, _put(batch, batch_sharding))
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            count = count + n
        totals, count = jax.device_get((totals, count))
        return {k: float(v) / float(count) for k, v in totals.items()}

    def fresh_opt_state(ts: TrainState) -> TrainState:
        return ts._replace(opt_state=_put(optimizer.init(_params(ts.model)), replicated))

    ts = TrainState(0, _put(model, replicated), _put(state, replicated), None)
    history: list[dict[str, Any]] = []
    latest = checkpoints.latest() if checkpoints is not None and config.resume else None
    if latest is not None:
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
        ts = checkpoints.restore(fresh_opt_state(ts), replicated, meta)
        if (out_dir / "metrics.jsonl").exists():
            lines = (out_dir / "metrics.jsonl").read_text().splitlines()
            history = [
                r
                for r in map(json.loads, lines)
                if r["step"] < latest or (r["step"] == latest and "event" not in r)
            ]
    else:
        ts = fresh_opt_state(ts)

    def record(entry: dict[str, Any]) -> None:
        history.append(entry)
        if is_main and out_dir is not None:
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    def record_replacement(before: TrainState, after: TrainState) -> None:
        step = after.step
        if not any(r["step"] == step and r["split"] == "eval" for r in history):
            record({"step": step, "split": "eval", **evaluate(before)})
        record({"step": step, "split": "eval", "event": REPLACED, **evaluate(after)})

    if is_main and out_dir is not None:
        _write_history(out_dir / "metrics.jsonl", history)

    def due(every: int, step: int) -> bool:
        return step == config.steps or (every > 0 and step % every == 0)

    def finite(pending: list[dict[str, Array]]) -> list[dict[str, Any]]:
        """The pending steps' metrics on the host; `TrainingDiverged` at a non-finite loss."""
        fetched = jax.device_get(pending)
        for step, metrics in enumerate(fetched, start=ts.step - len(fetched) + 1):
            if not np.isfinite(metrics["loss"]):
                record(
                    {"step": step, "split": "train", **{k: float(v) for k, v in metrics.items()}}
                )
                saved = checkpoints.latest() if checkpoints is not None else None
                raise TrainingDiverged(
                    f"training diverged: the loss is {float(metrics['loss'])} at step {step}. "
                    "Lower optim.lr, clip the gradients (optim.grad_clip=1.0), train in fp32 "
                    "(train.precision=fp32) or check the data"
                    + (f"; the last checkpoint is from step {saved}." if saved else ".")
                )
        return fetched

    base_key = jax.random.key(config.seed)
    batches = train_data(ts.step)
    pending: list[dict[str, Array]] = []  # this logging window's metrics, on device
    window: list[dict[str, Any]] = []  # ... and those already fetched and checked
    examples, tick = 0, time.perf_counter()
    show = config.progress and is_main
    bar = tqdm(total=config.steps, initial=ts.step, unit="step", disable=not show)
    try:
        while ts.step < config.steps:
            for hook in hooks:
                before = ts
                ts = hook(ts)
                if ts.model is not before.model:
                    placed = _put((ts.model, ts.state), replicated)
                    ts = ts._replace(model=placed[0], state=placed[1])
                    if eval_fn is not None:
                        record_replacement(before, ts)
                if ts.opt_state is None:
                    ts = fresh_opt_state(ts)
            local = next(batches)
            batch_size = len(jax.tree.leaves(local)[0]) * jax.process_count()
            check_batch_size(batch_size, mesh)
            key = jax.random.fold_in(base_key, ts.step)
            batch = _put(local, batch_sharding)
            (model, state, opt_state), metrics = _train_step(
                spec, ts.model, ts.state, ts.opt_state, batch, key, jnp.asarray(ts.step)
            )
            ts = TrainState(ts.step + 1, model, state, opt_state)
            pending.append(metrics)
            examples += batch_size
            bar.update(1)
            log = due(config.log_every, ts.step)
            if log or (checkpoints is not None and due(config.checkpoint_every, ts.step)):
                window, pending = window + finite(pending), []
            if log:
                means = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
                rate = examples / (time.perf_counter() - tick)
                record({"step": ts.step, "split": "train", **means, "examples_per_s": rate})
                bar.set_postfix(loss=f"{means['loss']:.4f}", ex_per_s=f"{rate:.0f}")
                window, examples, tick = [], 0, time.perf_counter()
            if eval_fn is not None and due(config.eval_every, ts.step):
                record({"step": ts.step, "split": "eval", **evaluate(ts)})
            if checkpoints is not None and due(config.checkpoint_every, ts.step):
                saved = [getattr(hook, "checkpoint", lambda: None)() for hook in hooks]
                checkpoints.save(ts, {"step": ts.step, "hooks": saved})
            if examples == 0:  # just logged: time the next window from here
                tick = time.perf_counter()
    finally:
        bar.close()
        if checkpoints is not None:
            checkpoints.close()
    if is_main and out_dir is not None:
        plot_history(history, out_dir / "curves.png")
    return TrainResult(ts.model, ts.state, history, latest)
