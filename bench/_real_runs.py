"""The rows of bench/compress_real.py: every method at every budget on one `Task`, timed
and scored, with a resume file that keeps the rows of an interrupted run."""

import functools
import json
import os
import re
import time
from collections.abc import Callable

import equinox as eqx
import jax

import lowrank
from bench import peers
from bench._real_tasks import Task
from recipes import metrics

OURS = ("whitened", "nkp")
# (label, init, Budget(by=...)): one of ours with another rank allocator, same data.
ALLOCATORS = (
    ("ours: whitened, output ranks", "whitened", "output"),
    ("ours: whitened, weight ranks", "whitened", "weights"),
    ("ours: whitened, uniform ranks", "whitened", "uniform"),
    ("ours: nkp, uniform ranks", "nkp", "uniform"),
)
SEARCHED_LABEL = "ASVD + sensitivity ranks"


def our_settings(init: str) -> list[tuple[str, str]]:
    """(label, Budget(by=...)) of init's rows, in table order: by="data" ranks first, then
    its `ALLOCATORS`."""
    return [(f"ours: {init}", "data"), *((l, by) for l, of, by in ALLOCATORS if of == init)]


def say(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def _block(tree):
    jax.block_until_ready(eqx.filter(tree, eqx.is_array))
    return tree


def methods(task: Task, ratio: float, search: dict | None, allocators: bool = True):
    """(label, thunk -> compressed model) for every row at one budget."""
    plan = peers.uniform_plan(task.model, ratio, target=task.target)
    peer = functools.partial(lowrank.factorize, task.model, plan=plan, sequential=False)
    rows = [
        ("plain SVD", lambda: peer(init=peers.PlainSVD())),
        ("SVD-LLM (W)", lambda: peer(init=peers.SVDLLM(), calibration=task.calibration)),
        ("ASVD", lambda: peer(init=peers.ASVD(alpha=0.5), calibration=task.calibration)),
    ]
    if search is not None:

        def searched():
            plan = peers.asvd_sensitivity_plan(
                task.model, ratio, target=task.target, sensitivity=search["sensitivity"]
            )
            return lowrank.factorize(task.model, plan=plan, init=peers.ScaledASVD(search["scales"]))

        rows.append((SEARCHED_LABEL, searched))
    ours = functools.partial(
        lowrank.factorize,
        task.model,
        target=task.target,
        calibration=task.calibration,
        activations=task.activations,
        key=jax.random.key(0),
    )
    budget = functools.partial(lowrank.Budget, params=ratio)
    probed = {} if task.calibration_batch is None else {"calibration": task.calibration_batch}
    # by="data" named (Budget's default is "weights"): these rows keep their meaning.
    for init in OURS:
        settings = our_settings(init) if allocators else our_settings(init)[:1]
        rows += [
            (
                label,
                functools.partial(
                    ours, rank=budget(by=by), init=init, **(probed if by == "output" else {})
                ),
            )
            for label, by in settings
        ]
    return rows


def asvd_search(task: Task) -> dict:
    """ASVD's scales and per-layer sensitivity, measured once; with its wall time."""
    start = time.perf_counter()
    scales = peers.activation_scales(task.model, task.calibration, target=task.target, alpha=0.5)
    loss = task.search_loss
    sensitivity = peers.asvd_sensitivity(
        task.model, target=task.target, scales=scales, loss=loss, candidates=task.search_candidates
    )
    seconds = time.perf_counter() - start
    say(f"{task.name}: ASVD sensitivity of {len(sensitivity)} layers in {seconds:.0f} s")
    return {"scales": scales, "sensitivity": sensitivity, "seconds": seconds}


def _load_resume(path: str | None, task: Task) -> dict:
    """Rows of an earlier, interrupted run on the same data ({(budget, label): row})."""
    if path is None or not os.path.exists(path):
        return {}
    with open(path) as f:
        saved = json.load(f)
    if saved.get("model") != task.name or saved.get("notes") != task.notes:
        raise SystemExit(
            f"--resume {path} holds rows of another model or other data ({saved.get('model')}); "
            "delete it or pass another file"
        )
    return {(r["budget"], r["label"]): r["row"] for r in saved["rows"]}


def _save_resume(path: str | None, task: Task, results: dict) -> None:
    if path is None:
        return
    rows = [{"budget": b, "label": l, "row": r} for (b, l), r in results.items()]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"model": task.name, "notes": task.notes, "rows": rows}, f)
    os.replace(tmp, path)


def _measure(task: Task, thunk, selected: int, run: str, search_seconds: float) -> dict:
    """One row: compress with `thunk`, time it (plus `search_seconds`), score it."""
    start = time.perf_counter()
    compressed = _block(thunk())
    seconds = time.perf_counter() - start + search_seconds
    dense_params = metrics.param_count(task.model)
    params = metrics.param_count(compressed)
    kept = (selected - (dense_params - params)) / selected
    scores = task.evaluate(compressed)
    return {**scores, "kept": kept, "params": params, "seconds": seconds, "run": run}


def run_task(
    task: Task,
    budgets,
    searched: bool,
    report: Callable[[dict], None],
    *,
    resume: str | None = None,
    allocators: bool = True,
    only: re.Pattern | None = None,
) -> dict:
    """Dense, then every method at every budget (NKP rows last: the slowest), calling
    `report(results)` after each row. Returns {(budget, label): row}. With `resume` (a
    JSON file), rows already there are kept and every new row is added to it; with
    `allocators`, also ours: whitened with the other rank allocators; with `only`, just
    the rows whose label it matches (the ASVD search only if its row is among them)."""
    selected = lowrank.plan(task.model, rank=1, target=task.target).totals()["params_before"]
    start = time.perf_counter()
    dense = task.evaluate(task.model)
    say(f"{task.name}: dense {dense} ({time.perf_counter() - start:.0f} s)")
    run = time.strftime("%Y-%m-%d %H:%M:%S")
    earlier = _load_resume(resume, task)
    params = metrics.param_count(task.model)
    results = {
        (1.0, "dense"): {**dense, "kept": 1.0, "params": params, "seconds": None, "run": run}
    }
    results |= {key: row for key, row in earlier.items() if key[0] in budgets}
    if earlier:
        say(f"{task.name}: resuming {len(results) - 1} rows from {resume}")
    report(results)
    wanted = (lambda label: True) if only is None else (lambda label: bool(only.search(label)))
    need_search = (
        searched
        and wanted(SEARCHED_LABEL)
        and any((b, SEARCHED_LABEL) not in results for b in budgets)
    )
    search = asvd_search(task) if need_search else ({} if searched else None)
    todo = [
        (ratio, label, thunk)
        for ratio in budgets
        for label, thunk in methods(task, ratio, search, allocators)
        if (ratio, label) not in results and wanted(label)
    ]
    todo.sort(key=lambda t: t[1] == "ours: nkp")  # stable: budgets and methods in order otherwise
    for ratio, label, thunk in todo:
        extra = search["seconds"] if label == SEARCHED_LABEL else 0.0
        row = _measure(task, thunk, selected, run, extra)
        results[(ratio, label)] = row
        scores = {c: row[c] for c in task.columns}
        say(
            f"{task.name} {ratio:g} {label}: {scores} kept {row['kept']:.3f}, "
            f"factorized in {row['seconds']:.1f} s"
        )
        _save_resume(resume, task, results)
        report(results)
    return results
