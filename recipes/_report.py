"""What a factorized run reports: size, FLOPs, speed and quality, dense against low-rank.

Parameters and FLOPs come from `lowrank.summary` (FLOPs of the Linear/Conv layers, one
example); inference time is the median wall time of the jitted inference-mode forward
pass on one eval batch, both models timed in the same process; train step time is
the median over the trainer's logging windows, split at the factorization step; the
metrics are the trainer's eval records just before and right after factorization,
and the last one.
"""

import statistics
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import lowrank
from jaxtyping import PyTree

from .train import REPLACED


def _median_seconds(fn: Callable, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inference_seconds(eval_fn, model: PyTree, state: PyTree, batch, *, repeats: int = 10) -> float:
    """Median seconds of the jitted inference-mode `eval_fn(model, state, batch)`."""
    run = eqx.filter_jit(lambda m, s, b: eval_fn(eqx.nn.inference_mode(m), s, b))
    return _median_seconds(run, model, state, batch, repeats=repeats)


def step_seconds(history: list[dict[str, Any]], batch_size: int, *, after: int = 0, until: float = float("inf")) -> float | None:
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
    repeats: int = 10,
) -> dict[str, Any]:
    """Dense vs factorized: params, FLOPs and inference time (with ratios), train step
    times before and after `factorized_at`, and the eval metrics around it."""
    d, l = lowrank.summary(dense, example=example), lowrank.summary(low, example=example)
    t_dense = inference_seconds(eval_fn, dense, state, eval_batch, repeats=repeats)
    t_low = inference_seconds(eval_fn, low, state, eval_batch, repeats=repeats)
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
        "train_step_ratio": None if dense_step is None or low_step is None else low_step / dense_step,
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
        f"inference on {eval_batch_size} examples (median): dense {r['inference_s_dense'] * 1e3:.1f} ms, "
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
