"""What a factorized run reports: size, FLOPs, speed and quality, dense against low-rank.

Parameters and FLOPs come from `lowrank.summary` (FLOPs of the Linear/Conv layers, one
example); inference time is the wall time of the jitted inference-mode forward pass on
one eval batch, both models timed in turns in the same process; train step time is
the median over the trainer's logging windows, split at the factorization step; the
metrics are the trainer's eval records just before and right after factorization,
and the last one.
"""

import statistics
import time
from typing import Any

import equinox as eqx
import jax
from jaxtyping import PyTree

import lowrank

from .train import REPLACED


def seconds_in_turns(
    fn, models: list[PyTree], *args, rounds: int = 3, repeats: int = 5
) -> list[float]:
    """Seconds per `fn(model, *args)` for each model: the models take turns for `rounds`
    rounds of `repeats` calls, and each keeps its best round's median, so a burst of
    load on a shared machine hits them alike.

    Args:
        fn: `fn(model, *args)`, timed until its outputs are ready (called once per
            model first, untimed, to compile).
        models: the models to compare.
        *args: the other arguments of `fn`.
        rounds: rounds of turns.
        repeats: calls per model per round.

    Returns:
        Seconds per call, one per model, in the order of `models`.
    """
    for model in models:
        jax.block_until_ready(fn(model, *args))  # compile
    best = [float("inf")] * len(models)
    for _ in range(rounds):
        for i, model in enumerate(models):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(fn(model, *args))
                times.append(time.perf_counter() - start)
            best[i] = min(best[i], statistics.median(times))
    return best


def inference_seconds(eval_fn, models: list[PyTree], state: PyTree, batch, **turns) -> list[float]:
    """`seconds_in_turns` of the jitted inference-mode `eval_fn(model, state, batch)`.

    Args:
        eval_fn: `(model, state, batch) -> metrics`, as a task's.
        models: the models to compare.
        state: their shared state (e.g. BatchNorm statistics), or None.
        batch: one eval batch.
        **turns: `rounds` / `repeats` of `seconds_in_turns`.

    Returns:
        Seconds per forward, one per model.
    """
    run = eqx.filter_jit(lambda m, s, b: eval_fn(eqx.nn.inference_mode(m), s, b))
    return seconds_in_turns(run, models, state, batch, **turns)


def step_seconds(
    history: list[dict[str, Any]], batch_size: int, *, after: int = 0, until: float = float("inf")
) -> float | None:
    """Median train step time over the logging windows ending in (after, until]."""
    times = [
        batch_size / r["examples_per_s"]
        for r in history
        if r["split"] == "train" and after < r["step"] <= until and r.get("examples_per_s")
    ]
    return statistics.median(times) if times else None


def factorization_evals(history: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The eval records "before" and "after" the factorization (hybrid runs only) and the
    "final" one, each without its bookkeeping keys."""
    evals = [r for r in history if r["split"] == "eval"]
    out = {}
    replaced = [r for r in evals if r.get("event") == REPLACED]
    if replaced:
        step = replaced[-1]["step"]
        before = [r for r in evals if r["step"] == step and "event" not in r]
        if before:
            out["before"] = before[-1]
        out["after"] = replaced[-1]
    if evals:
        out["final"] = evals[-1]
    return {k: {m: v for m, v in r.items() if m not in ("split", "event")} for k, r in out.items()}


def factorization_report(
    dense: PyTree,
    low: PyTree,
    state: PyTree,
    *,
    eval_fn,
    eval_batch,
    example,
    history: list[dict[str, Any]],
    batch_size: int,
    factorized_at: int,
) -> dict[str, Any]:
    """Dense vs factorized: params, FLOPs and inference time (with ratios), train step
    times before and after `factorized_at`, and the eval metrics around it."""
    d, l = lowrank.summary(dense, example=example), lowrank.summary(low, example=example)
    t_dense, t_low = inference_seconds(eval_fn, [dense, low], state, eval_batch)
    dense_step = step_seconds(history, batch_size, until=factorized_at)
    low_step = step_seconds(history, batch_size, after=factorized_at)
    return {
        "factorized_at": factorized_at,
        "params_dense": d.total_params,
        "params_low": l.total_params,
        "params_ratio": l.total_params / d.total_params,
        "flops_dense": d.flops,
        "flops_low": l.flops,
        "flops_ratio": l.flops / d.flops,
        "inference_s_dense": t_dense,
        "inference_s_low": t_low,
        "inference_time_ratio": t_low / t_dense,
        "train_step_s_dense": dense_step,
        "train_step_s_low": low_step,
        "train_step_ratio": low_step / dense_step if dense_step and low_step else None,
        "evals": factorization_evals(history),
    }


def _metrics(record: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step")


def format_report(report: dict[str, Any], eval_batch_size: int) -> str:
    """The report as a few human-readable lines."""
    r = report
    lines = [
        f"parameters: {r['params_dense']:,} -> {r['params_low']:,} (x{r['params_ratio']:.3f})",
        f"FLOPs (conv/linear, one example): {r['flops_dense']:,} -> {r['flops_low']:,} "
        f"(x{r['flops_ratio']:.3f})",
        f"inference on {eval_batch_size} examples: dense {r['inference_s_dense'] * 1e3:.1f} ms, "
        f"factorized {r['inference_s_low'] * 1e3:.1f} ms -> time ratio "
        f"{r['inference_time_ratio']:.3f} vs FLOP ratio {r['flops_ratio']:.3f}",
    ]
    if r["train_step_ratio"] is not None:
        lines.append(
            f"train step (median): dense {r['train_step_s_dense'] * 1e3:.0f} ms, factorized "
            f"{r['train_step_s_low'] * 1e3:.0f} ms -> ratio {r['train_step_ratio']:.3f}"
        )
    evals = r["evals"]
    for name, label in (
        ("before", "dense, end of warm-up"),
        ("after", "right after factorization"),
        ("final", "after low-rank training"),
    ):
        if name in evals:
            lines.append(f"eval {label} (step {evals[name]['step']}): {_metrics(evals[name])}")
    return "\n".join(lines)
