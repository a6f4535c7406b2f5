"""The RESULTS.md section of one model of bench/compress_real.py: notes, the table of
rows measured so far and the targets' verdicts."""

import os

import lowrank
from bench._real_runs import ALLOCATORS, OURS, SEARCHED_LABEL, our_settings
from bench._real_tasks import Task
from bench._results import markdown_table

LOWER_IS_BETTER = {"perplexity", "bits/byte", "KL"}
LABELS = (
    "plain SVD",
    "SVD-LLM (W)",
    "ASVD",
    SEARCHED_LABEL,
    *(label for init in OURS for label, _ in our_settings(init)),
)


def table(task: Task, results: dict, budgets) -> str:
    """The markdown table of the rows measured so far, by budget then method."""
    header = [
        "budget",
        "method",
        "selected params kept",
        "model params",
        *task.columns,
        "factorize s",
    ]
    rows = []
    for key in [(1.0, "dense")] + [(b, l) for b in budgets for l in LABELS]:
        if key in results:
            r = results[key]
            seconds = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
            rows.append(
                [
                    f"{key[0]:g}",
                    key[1],
                    r["kept"],
                    r["params"],
                    *(r[c] for c in task.columns),
                    seconds,
                ]
            )
    return markdown_table(header, rows)


def _worded(task: Task, ok: bool) -> str:
    if task.name == "minilm":  # the issues set no target for MiniLM
        return "ahead" if ok else "behind"
    return "met" if ok else "MISSED"


def _peer_verdicts(task: Task, results: dict, ratio: float) -> list[str]:
    """Issue 12's targets at one budget: our best setting (any init or allocator row)
    against the peers."""
    ours = [f"ours: {i}" for i in OURS]
    others = set(ours) | {label for label, *_ in ALLOCATORS}
    peer_labels = sorted({l for (b, l) in results if b == ratio} - others)
    if not all((ratio, l) in results for l in ours) or (ratio, "SVD-LLM (W)") not in results:
        return [f"- {ratio:g}: not measured (yet)"]
    ours += [label for label, *_ in ALLOCATORS if (ratio, label) in results]
    if task.name == "smollm2":
        dense = results[(1.0, "dense")]["perplexity"]
        svdllm = results[(ratio, "SVD-LLM (W)")]["perplexity"] - dense
        best_label = min(ours, key=lambda l: results[(ratio, l)]["perplexity"])
        best = results[(ratio, best_label)]["perplexity"] - dense
        ok = best <= 0.5 * svdllm
        return [
            f"- {ratio:g}: our best ({best_label}) adds {best:.4g} to dense perplexity, SVD-LLM "
            f"adds {svdllm:.4g}: {best / svdllm:.2f} of it (target <= 0.5): "
            f"**{'met' if ok else 'MISSED'}**"
        ]
    lines = []
    for column in task.columns:
        choose = min if column in LOWER_IS_BETTER else max
        best_label = choose(ours, key=lambda l: results[(ratio, l)][column])
        best_peer = choose(peer_labels, key=lambda l: results[(ratio, l)][column])
        ours_v = results[(ratio, best_label)][column]
        peer_v = results[(ratio, best_peer)][column]
        ok = choose(ours_v, peer_v) == ours_v
        lines.append(
            f"- {ratio:g}, {column}: our best {ours_v:.4g} ({best_label}), best peer {peer_v:.4g} "
            f"({best_peer}): **{_worded(task, ok)}**"
        )
    return lines


def _allocator_verdict(task: Task, results: dict, ratio: float) -> list[str]:
    """Issue 13's target at one budget: whitened with data-aware ranks (by="data" or
    by="output") beats it with weight and uniform ranks on the main metric.
    Nothing when no allocator row was asked for; a data-aware row not measured (by="output"
    can be out of memory) is named, and the verdict is over the ones that were."""
    whitened = [(l, by) for l, init, by in ALLOCATORS if init == "whitened"]
    data_aware = ["ours: whitened", *(l for l, by in whitened if by == "output")]
    baselines = [l for l, by in whitened if by in ("weights", "uniform")]
    if not any((ratio, l) in results for l in data_aware[1:] + baselines):
        return []
    column = task.columns[0]
    if not all((ratio, l) in results for l in data_aware[:1] + baselines):
        return [f"- {ratio:g}, rank allocator ({column}): not measured (yet)"]
    missing = [l for l in data_aware if (ratio, l) not in results]
    data_aware = [l for l in data_aware if l not in missing]
    value = {l: results[(ratio, l)][column] for l in data_aware + baselines}
    best = min if column in LOWER_IS_BETTER else max
    ours, theirs = best(value[l] for l in data_aware), best(value[l] for l in baselines)
    ok = ours < theirs if column in LOWER_IS_BETTER else ours > theirs
    named = {
        l: "data ranks" if l == "ours: whitened" else l.removeprefix("ours: whitened, ")
        for l in value
    }
    said = ", ".join(f"{named[l]} {value[l]:.4g}" for l in value)
    if missing:
        said += " (" + ", ".join(l.removeprefix("ours: whitened, ") for l in missing)
        said += ": not measured)"
    return [f"- {ratio:g}, rank allocator ({column}): {said}: **{_worded(task, ok)}**"]


def verdicts(task: Task, results: dict, budgets) -> list[str]:
    """The acceptance targets, met or missed, per budget."""
    lines = []
    for ratio in budgets:
        lines += _peer_verdicts(task, results, ratio)
        lines += _allocator_verdict(task, results, ratio)
    return lines


def _runs_note(results: dict) -> list[str]:
    runs = sorted({r["run"] for r in results.values()})
    if len(runs) < 2:
        return []
    return [
        (
            f"Rows measured in {len(runs)} processes on the same data (started "
            f"{', '.join(runs)}; the later ones resumed an earlier run with --resume, "
            "maybe at a later commit: the notes below say which rows changed code)."
        )
    ]


def _allocators_note(results: dict) -> list[str]:
    allocator_labels = {label for label, *_ in ALLOCATORS}
    if not any(label in allocator_labels for _, label in results):
        return []
    return [
        "'ours: whitened, output ranks' / 'weight ranks' / 'uniform ranks': the same init "
        "and calibration as 'ours: whitened' (whose ranks come from Budget(params=...), "
        "by='data': the whitened spectra), its ranks from by='output' (each truncation's "
        "Gauss-Newton effect on the calibration output, 16 probes) / by='weights' (the "
        "weight spectra) / by='uniform' (every layer the same fraction, as the peers' "
        "ranks); 'ours: nkp, uniform ranks': 'ours: nkp' with by='uniform'."
    ]


def section(task: Task, results: dict, budgets, load: float, *, done: bool) -> str:
    """One model's part of RESULTS.md: notes, table, targets."""
    heading = (
        "Comparison (the issue sets no target for MiniLM):" if task.name == "minilm" else "Targets:"
    )
    method = (
        "Peers use the papers' uniform ranks and the dense model's inputs; ours use "
        "Budget(params=..., by='data') (ranks allocated from the calibration data) and sequential "
        "calibration. Every method fits each layer on the same rows: at most "
        f"{lowrank._factorize.MAX_CALIBRATION_ROWS:,} per layer, drawn from all the "
        "calibration tokens / conv positions. 'factorize s' is the wall time "
        f"of lowrank.factorize, calibration included (load average {load:.1f} on "
        f"{os.cpu_count()} cores at the start; other jobs shared the machine)."
    )
    parts = [
        *task.notes,
        method,
        *_allocators_note(results),
        table(task, results, budgets),
        *_runs_note(results),
        heading + "\n" + "\n".join(verdicts(task, results, budgets)),
    ]
    body = "\n\n".join(parts)
    return body if done else body + "\n\n(run in progress: the rows so far)"
