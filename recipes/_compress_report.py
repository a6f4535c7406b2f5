"""The report of `compress`: report.json's contents and the before/after table."""

from typing import Any

from jaxtyping import PyTree

from ._compress_subject import Subject

_ROWS = {
    "params": ("parameters", "{:,}"),
    "flops": ("FLOPs (Linear/Conv, one example)", "{:,}"),
    "forward_ms": ("forward pass on one eval batch (ms)", "{:.1f}"),
    "perplexity": ("perplexity", "{:.3f}"),
    "bits_per_byte": ("bits per byte", "{:.4f}"),
    "kl_to_dense": ("KL(dense || model) (nats)", "{:.4f}"),
    "top1_agreement": ("top-1 agreement with dense", "{:.3f}"),
    "cosine_to_dense": ("cosine similarity to dense", "{:.4f}"),
    "nn_agreement": ("nearest-neighbour agreement", "{:.3f}"),
}


def format_table(report: dict[str, Any]) -> str:
    """The report's models side by side: one row per metric, one column per model
    (dense, compressed, and healed when there was healing).

    Args:
        report: what `compress` returns (and writes to report.json).

    Returns:
        The table as text.
    """
    columns = [c for c in ("dense", "compressed", "healed") if c in report["models"]]
    rows = [["", *columns]]
    for key, (label, fmt) in _ROWS.items():
        values = [report["models"][c].get(key) for c in columns]
        if any(v is not None for v in values):
            rows.append([label, *("-" if v is None else fmt.format(v) for v in values)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    seconds = report["seconds"]
    lines.append(", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    for name, text in report.get("generation", {}).items():
        lines.append(f"{name}: {text!r}")
    return "\n".join(lines)


def generations(subject: Subject, models: dict[str, PyTree]) -> dict[str, str]:
    """Greedy continuations of the prompt by each model ({} for non-LMs).

    Args:
        subject: the compressed subject (its config holds the prompt).
        models: {name: model}.

    Returns:
        {"prompt": ..., name: continuation}, or {}.
    """
    out = {name: subject.generate(model) for name, model in models.items()}
    out = {name: text for name, text in out.items() if text is not None}
    return {"prompt": subject.config.generate.prompt, **out} if out else {}


def report_data(config, subject: Subject, target: str, plan, measured, seconds) -> dict[str, Any]:
    """What report.json holds (all but the generations).

    Args:
        config: the `CompressConfig`.
        subject: the compressed subject.
        target: the target-layer pattern.
        plan: the factorization's `lowrank.Plan`.
        measured: {model name: its metrics}.
        seconds: {phase: wall seconds}.

    Returns:
        The report.
    """
    f, totals = config.factorize, plan.totals()
    return {
        "model": config.model.name,
        "rank": str(f.rank),
        "init": f.init,
        "target": target,
        "budget": plan.budget,
        "factorized_layers": len(plan.factorized),
        "target_params_before": totals["params_before"],
        "target_params_after": totals["params_after"],
        "data": {k: list(v) for k, v in subject.sources.items()},
        "models": measured,
        "seconds": seconds,
    }
