"""Real pretrained models compressed by the peers and by lowrank, every row measured in
the same run on the same data (issue 12's acceptance tables).

    python -m bench.compress_real [--models smollm2,mobilenet_v2,efficientnet_lite0,minilm]
                                  [--budgets 0.8,0.6] [--asvd-search MODELS] [--quick]
                                  [--out bench/RESULTS.md]

Per model and parameter budget (the fraction of the selected layers' parameters kept):
- peers (bench/peers.py), fitted on the dense model's inputs (sequential=False) with the
  papers' uniform ranks, int(m·n·ratio / (m + n)) per layer: plain truncated SVD,
  SVD-LLM (W) (truncation-aware whitening) and ASVD (α = 0.5); with `--asvd-search`,
  also ASVD with its sensitivity-based ranks (the sensitivity is measured once per
  model and its time is counted in that row at every budget);
- ours: `lowrank.factorize(rank=Budget(params=ratio), init="whitened" | "nkp")` with
  the default sequential calibration, the activation after each layer given.
Models, data (calibration and evaluation always from disjoint articles / photographs):
- smollm2: SmolLM2-135M-Instruct, the 7 block linears of its 30 blocks (q/k/v/o/gate/
  up/down). Calibration: 128 windows of 256 tokens from the BBC categories business,
  politics and sport; evaluation: 32 windows of 256 next-token predictions from
  entertainment and tech. Perplexity, bits per byte. Target: our best setting has at
  most half of SVD-LLM's perplexity increase over dense, at every budget.
- mobilenet_v2, efficientnet_lite0: the 1x1 expand/project convs, the 1x1 head conv
  and the classifier. 256 calibration and 512 evaluation 224x224 crops from disjoint
  photographs (recipes.data.photo_split). KL(dense || compressed) and top-1
  agreement with the dense model. Our inits fit each conv's output after its BatchNorm
  and activation (recipes' `normalized_activations`). Target: our best is at least as
  good as every peer on both.
- minilm: all-MiniLM-L6-v2, every linear of its 6 layers; 256 calibration paragraphs
  (calibration categories) and 512 evaluation paragraphs (evaluation categories), 128
  tokens. Cosine similarity to the dense embeddings, nearest-neighbour agreement.
The BBC News corpus is for research use only. `--quick` shrinks every model (2 layers /
1 block per stage), the data and ASVD's search, at one budget (0.6), to smoke-test the
whole script; it writes RESULTS.md only when `--out` is given. Each model owns one section of --out.
"""

import argparse
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import lowrank
from bench import peers
from bench._results import RESULTS, markdown_table, write_section
from recipes import metrics
from recipes.data import (
    bbc_split,
    photo_crops,
    photo_split,
    text_bytes,
    token_windows,
    tokenize,
)
from recipes.models import BATCH_AXIS
from recipes.policy import normalized_activations

MODELS = ("smollm2", "mobilenet_v2", "efficientnet_lite0", "minilm")
BUDGETS = (0.8, 0.6)
SEARCHED = ("mobilenet_v2", "efficientnet_lite0", "minilm")  # ASVD search by default
OURS = ("whitened", "nkp")
LOWER_IS_BETTER = {"perplexity", "bits/byte", "KL"}


@dataclass
class Sizes:
    """Data sizes of one run (full or --quick)."""

    llm_layers: int | None = None
    llm_calibration: tuple[int, int] = (128, 256)  # windows x tokens
    llm_evaluation: tuple[int, int] = (32, 256)  # windows x predicted tokens
    llm_search_windows: int = 8
    blocks_per_stage: int | None = None
    image_size: int = 224
    calibration_crops: int = 256
    evaluation_crops: int = 512
    search_crops: int = 64
    encoder_layers: int | None = None
    text_tokens: int = 128
    calibration_texts: int = 256
    evaluation_texts: int = 512
    search_texts: int = 64
    chunk: int = 4  # LM windows / 16x images / 16x texts per evaluation call
    search_candidates: tuple[float, ...] = peers.ASVD_RATIOS


QUICK = Sizes(
    llm_layers=2,
    llm_calibration=(4, 32),
    llm_evaluation=(2, 32),
    llm_search_windows=2,
    blocks_per_stage=1,
    image_size=64,
    calibration_crops=16,
    evaluation_crops=16,
    search_crops=8,
    encoder_layers=2,
    text_tokens=32,
    calibration_texts=16,
    evaluation_texts=16,
    search_texts=8,
    search_candidates=(0.4, 0.8),
)


@dataclass
class Task:
    """One model: what to compress, how to calibrate, how to score."""

    name: str
    title: str
    model: eqx.Module
    target: str
    calibration: Callable  # fn(model), as lowrank.factorize takes it
    activations: dict
    evaluate: Callable[[eqx.Module], dict[str, float]]
    search_loss: Callable[[eqx.Module], float]
    search_candidates: tuple[float, ...]
    columns: list[str]  # metric names, in table order
    notes: list[str] = field(default_factory=list)


def say(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def _chunks(n: int, size: int):
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


# ---------------------------------------------------------------- SmolLM2 on BBC


def smollm2_task(sizes: Sizes) -> Task:
    from recipes.pretrained import smollm2

    model, tokenizer = smollm2(num_layers=sizes.llm_layers)
    split = bbc_split()
    (n_cal, t_cal), (n_eval, t_eval) = sizes.llm_calibration, sizes.llm_evaluation
    calibration_ids = jnp.asarray(token_windows(tokenizer, split.calibration, t_cal, n_cal, seed=0))
    windows = token_windows(tokenizer, split.evaluation, t_eval + 1, n_eval, seed=1)
    inputs, targets = jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, 1:])
    n_bytes = text_bytes(tokenizer, windows[:, 1:])

    def residual_stream(m, ids):  # the blocks only: the head's logits are not needed
        x = jax.vmap(m.embed)(ids)
        positions = jnp.arange(ids.shape[0])
        for block in m.blocks:
            x, _ = block(x, positions)
        return x

    @eqx.filter_jit
    def losses(m, ids, tgt):
        return metrics.token_losses(jax.vmap(m)(ids), tgt)

    def all_losses(m, ids, tgt):
        return jnp.concatenate(
            [losses(m, ids[s], tgt[s]).reshape(-1) for s in _chunks(len(ids), sizes.chunk)]
        )

    def evaluate(m):
        loss = all_losses(m, inputs, targets)
        return {
            "perplexity": float(metrics.perplexity(loss)),
            "bits/byte": float(metrics.bits_per_byte(loss, n_bytes)),
        }

    search_ids = calibration_ids[: sizes.llm_search_windows]

    def search_loss(m):  # ASVD: perplexity on calibration data
        return float(metrics.perplexity(all_losses(m, search_ids[:, :-1], search_ids[:, 1:])))

    layers = "" if sizes.llm_layers is None else f", first {sizes.llm_layers} blocks"
    return Task(
        name="smollm2",
        title=f"SmolLM2-135M-Instruct on BBC News{layers}",
        model=model,
        target=r"blocks\.\d+\.(attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
        calibration=lambda m: jax.vmap(functools.partial(residual_stream, m))(calibration_ids),
        activations={
            r".*\.mlp\.gate_proj": jax.nn.silu,
            r".*\.(attn\.(q|k|v|o)_proj|mlp\.(up|down)_proj)": None,
        },
        evaluate=evaluate,
        search_loss=search_loss,
        search_candidates=sizes.search_candidates,
        columns=["perplexity", "bits/byte"],
        notes=[
            (
                f"Calibration: {n_cal} windows x {t_cal} tokens from BBC {', '.join(split.calibration_from)}; "
                f"evaluation: {n_eval} windows x {t_eval} next-token predictions ({n_bytes:,} bytes) "
                f"from {', '.join(split.evaluation_from)} (BBC News: research use only). "
                "Selected: q/k/v/o/gate/up/down of every block; embeddings (tied head) and norms dense."
            ),
        ],
    )


# ---------------------------------------------------------------- CNNs on photo crops


def cnn_task(name: str, sizes: Sizes) -> Task:
    from recipes import pretrained

    if name == "mobilenet_v2":
        model, state = pretrained.mobilenet_v2(blocks_per_stage=sizes.blocks_per_stage)
        normalization, title = (
            pretrained.MOBILENET_V2_NORMALIZATION,
            "MobileNetV2 (torchvision ImageNet)",
        )
    else:
        model, state = pretrained.efficientnet_lite0(blocks_per_stage=sizes.blocks_per_stage)
        normalization, title = (
            pretrained.EFFICIENTNET_LITE0_NORMALIZATION,
            "EfficientNet-Lite0 (ImageNet)",
        )
    split = photo_split(seed=0)
    crops = functools.partial(photo_crops, normalization=normalization, size=sizes.image_size)
    calibration = jnp.asarray(crops(split.calibration, sizes.calibration_crops, seed=0))
    evaluation = jnp.asarray(crops(split.evaluation, sizes.evaluation_crops, seed=1))
    search = calibration[: sizes.search_crops]
    convs = r"stages\.\d+\.blocks\.\d+\.(expand|project)\.conv|head\.conv"
    target = convs + "|classifier"

    @eqx.filter_jit
    def logits(m, images):
        return jax.vmap(lambda x: m(x, state, inference=True)[0], axis_name=BATCH_AXIS)(images)

    def all_logits(m, images):
        return jnp.concatenate(
            [logits(m, images[s]) for s in _chunks(len(images), 16 * sizes.chunk)]
        )

    dense = all_logits(model, evaluation)
    dense_search = all_logits(model, search)

    def evaluate(m):
        out = all_logits(m, evaluation)
        return {
            "KL": float(metrics.kl_divergence(dense, out)),
            "top-1 agreement": float(metrics.top1_agreement(dense, out)),
        }

    blocks = (
        ""
        if sizes.blocks_per_stage is None
        else f", first {sizes.blocks_per_stage} block(s) per stage"
    )
    return Task(
        name=name,
        title=f"{title} on photo crops{blocks}",
        model=model,
        target=target,
        calibration=lambda m: logits(m, calibration),
        activations={**normalized_activations(model, state, convs), "classifier": None},
        evaluate=evaluate,
        search_loss=lambda m: float(metrics.kl_divergence(dense_search, all_logits(m, search))),
        search_candidates=sizes.search_candidates,
        columns=["KL", "top-1 agreement"],
        notes=[
            (
                f"Calibration: {len(calibration)} crops of {', '.join(split.calibration)}; evaluation: "
                f"{len(evaluation)} crops of {', '.join(split.evaluation)} ({sizes.image_size}x"
                f"{sizes.image_size}). Selected: 1x1 expand/project convs, the head conv and the "
                "classifier; stem and depthwise convs dense. ASVD's sensitivity uses KL to dense on "
                f"{len(search)} calibration crops (no labels: the paper's perplexity has no "
                "counterpart here)."
            ),
        ],
    )


# ---------------------------------------------------------------- MiniLM on BBC paragraphs


def _paragraphs(articles, count: int, seed: int) -> list[str]:
    paragraphs = [p for a in articles for p in a.split("\n") if len(p.split()) >= 30]
    pick = np.random.default_rng(seed).permutation(len(paragraphs))[:count]
    return [paragraphs[i] for i in np.sort(pick)]


def minilm_task(sizes: Sizes) -> Task:
    from recipes.pretrained import minilm

    model, tokenizer = minilm(num_layers=sizes.encoder_layers, max_length=sizes.text_tokens)
    split = bbc_split()
    cal_ids, cal_mask = map(
        jnp.asarray, tokenize(tokenizer, _paragraphs(split.calibration, sizes.calibration_texts, 0))
    )
    ev_ids, ev_mask = map(
        jnp.asarray, tokenize(tokenizer, _paragraphs(split.evaluation, sizes.evaluation_texts, 1))
    )

    @eqx.filter_jit
    def embed(m, ids, mask):
        return jax.vmap(m)(ids, mask)

    def all_embed(m, ids, mask):
        return jnp.concatenate(
            [embed(m, ids[s], mask[s]) for s in _chunks(len(ids), 16 * sizes.chunk)]
        )

    dense = all_embed(model, ev_ids, ev_mask)
    n_search = sizes.search_texts
    dense_search = all_embed(model, cal_ids[:n_search], cal_mask[:n_search])

    def evaluate(m):
        out = all_embed(m, ev_ids, ev_mask)
        return {
            "cosine to dense": float(metrics.cosine_similarity(dense, out)),
            "NN agreement": float(metrics.nearest_neighbour_agreement(dense, out)),
        }

    def search_loss(m):
        out = all_embed(m, cal_ids[:n_search], cal_mask[:n_search])
        return 1.0 - float(metrics.cosine_similarity(dense_search, out))

    layers = "" if sizes.encoder_layers is None else f", first {sizes.encoder_layers} layers"
    return Task(
        name="minilm",
        title=f"all-MiniLM-L6-v2 on BBC paragraphs{layers}",
        model=model,
        target=r"layers\.\d+\..*",
        calibration=lambda m: embed(m, cal_ids, cal_mask),
        activations={
            r".*\.intermediate\.dense": functools.partial(jax.nn.gelu, approximate=False),
            r"layers\.\d+\.(attention\.(query|key|value|output\.dense)|output\.dense)": None,
        },
        evaluate=evaluate,
        search_loss=search_loss,
        search_candidates=sizes.search_candidates,
        columns=["cosine to dense", "NN agreement"],
        notes=[
            (
                f"Calibration: {len(cal_ids)} paragraphs (>= 30 words) from BBC "
                f"{', '.join(split.calibration_from)}; evaluation: {len(ev_ids)} from "
                f"{', '.join(split.evaluation_from)}; {sizes.text_tokens} tokens (padded/truncated). "
                "Selected: every linear of every layer. ASVD's sensitivity uses 1 - cosine to dense "
                f"on {n_search} calibration paragraphs."
            ),
        ],
    )


# ---------------------------------------------------------------- methods and rows


def _block(tree):
    jax.block_until_ready(eqx.filter(tree, eqx.is_array))
    return tree


def methods(task: Task, ratio: float, search: dict | None):
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

        rows.append(("ASVD + sensitivity ranks", searched))
    for init in OURS:
        rows.append((
            f"ours: {init}",
            functools.partial(
                lowrank.factorize, task.model, rank=lowrank.Budget(params=ratio), target=task.target,
                init=init, calibration=task.calibration, activations=task.activations,
                key=jax.random.key(0),
            ),
        ))  # fmt: skip
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


def run_task(
    task: Task,
    budgets,
    searched: bool,
    report: Callable[[dict], None],
    *,
    resume: str | None = None,
) -> dict:
    """Dense, then every method at every budget (NKP rows last: the slowest), calling
    `report(results)` after each row. Returns {(budget, label): row}. With `resume` (a
    JSON file), rows already there are kept and every new row is added to it."""
    selected = lowrank.plan(task.model, rank=1, target=task.target).totals()["params_before"]
    dense_params = metrics.param_count(task.model)
    start = time.perf_counter()
    dense = task.evaluate(task.model)
    say(f"{task.name}: dense {dense} ({time.perf_counter() - start:.0f} s)")
    run = time.strftime("%Y-%m-%d %H:%M:%S")
    earlier = _load_resume(resume, task)
    results = {
        (1.0, "dense"): {**dense, "kept": 1.0, "params": dense_params, "seconds": None, "run": run}
    }
    results |= {key: row for key, row in earlier.items() if key[0] in budgets}
    if earlier:
        say(f"{task.name}: resuming {len(results) - 1} rows from {resume}")
    report(results)
    need_search = searched and any((b, "ASVD + sensitivity ranks") not in results for b in budgets)
    search = asvd_search(task) if need_search else ({} if searched else None)
    todo = [
        (ratio, label, thunk) for ratio in budgets for label, thunk in methods(task, ratio, search)
        if (ratio, label) not in results
    ]  # fmt: skip
    todo.sort(key=lambda t: t[1] == "ours: nkp")  # stable: budgets and methods in order otherwise
    for ratio, label, thunk in todo:
        start = time.perf_counter()
        compressed = _block(thunk())
        seconds = time.perf_counter() - start
        if label.startswith("ASVD +"):
            seconds += search["seconds"]
        params = metrics.param_count(compressed)
        kept = (selected - (dense_params - params)) / selected
        scores = task.evaluate(compressed)
        results[(ratio, label)] = {
            **scores,
            "kept": kept,
            "params": params,
            "seconds": seconds,
            "run": run,
        }
        say(
            f"{task.name} {ratio:g} {label}: {scores} kept {kept:.3f}, factorized in {seconds:.1f} s"
        )
        del compressed
        _save_resume(resume, task, results)
        report(results)
    return results


def table(task: Task, results: dict, budgets) -> str:
    """The markdown table of the rows measured so far, by budget then method."""
    labels = [
        "plain SVD",
        "SVD-LLM (W)",
        "ASVD",
        "ASVD + sensitivity ranks",
        *(f"ours: {i}" for i in OURS),
    ]
    header = [
        "budget",
        "method",
        "selected params kept",
        "model params",
        *task.columns,
        "factorize s",
    ]
    rows = []
    for key in [(1.0, "dense")] + [(b, l) for b in budgets for l in labels]:
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


def verdicts(task: Task, results: dict, budgets) -> list[str]:
    """The acceptance targets, met or missed, per budget."""
    lines = []
    ours = [f"ours: {i}" for i in OURS]
    for ratio in budgets:
        peer_labels = sorted({l for (b, l) in results if b == ratio} - set(ours))
        if not all((ratio, l) in results for l in ours) or (ratio, "SVD-LLM (W)") not in results:
            lines.append(f"- {ratio:g}: not measured (yet)")
            continue
        if task.name == "smollm2":
            dense = results[(1.0, "dense")]["perplexity"]
            svdllm = results[(ratio, "SVD-LLM (W)")]["perplexity"] - dense
            best_label = min(ours, key=lambda l: results[(ratio, l)]["perplexity"])
            best = results[(ratio, best_label)]["perplexity"] - dense
            ok = best <= 0.5 * svdllm
            lines.append(
                f"- {ratio:g}: our best ({best_label}) adds {best:.4g} to dense perplexity, SVD-LLM "
                f"adds {svdllm:.4g}: {best / svdllm:.2f} of it (target <= 0.5): "
                f"**{'met' if ok else 'MISSED'}**"
            )
            continue
        for column in task.columns:
            choose = min if column in LOWER_IS_BETTER else max
            best_label = choose(ours, key=lambda l: results[(ratio, l)][column])
            best_peer = choose(peer_labels, key=lambda l: results[(ratio, l)][column])
            ours_v, peer_v = (
                results[(ratio, best_label)][column],
                results[(ratio, best_peer)][column],
            )
            ok = choose(ours_v, peer_v) == ours_v
            verdict = (
                ("met" if ok else "MISSED")
                if task.name != "minilm"
                else ("ahead" if ok else "behind")
            )
            lines.append(
                f"- {ratio:g}, {column}: our best {ours_v:.4g} ({best_label}), best peer {peer_v:.4g} "
                f"({best_peer}): **{verdict}**"
            )
    return lines


def _runs_note(results: dict) -> list[str]:
    runs = sorted({r["run"] for r in results.values()})
    if len(runs) < 2:
        return []
    return [
        (
            f"Rows measured in {len(runs)} processes on the same data and code (started "
            f"{', '.join(runs)}; the later ones resumed an interrupted run with --resume)."
        )
    ]


def section(task: Task, results: dict, budgets, load: float, *, done: bool) -> str:
    """One model's part of RESULTS.md: notes, table, targets."""
    heading = (
        "Comparison (the issue sets no target for MiniLM):" if task.name == "minilm" else "Targets:"
    )
    body = "\n\n".join([
        *task.notes,
        (
            "Peers use the papers' uniform ranks and the dense model's inputs; ours use "
            "Budget(params=...) (ranks allocated from the calibration data) and sequential "
            "calibration. Every method fits each layer on the same rows: at most "
            f"{lowrank._factorize.MAX_CALIBRATION_ROWS:,} per layer, drawn from all the "
            "calibration tokens / conv positions. 'factorize s' is the wall time "
            f"of lowrank.factorize, calibration included (load average {load:.1f} on "
            f"{os.cpu_count()} cores at the start; other jobs shared the machine)."
        ),
        table(task, results, budgets),
        *_runs_note(results),
        heading + "\n" + "\n".join(verdicts(task, results, budgets)),
    ])  # fmt: skip
    return body if done else body + "\n\n(run in progress: the rows so far)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--budgets", default=None,
                        help=f"parameter fractions kept (default {','.join(map(str, BUDGETS))}; --quick: 0.6)")  # fmt: skip
    parser.add_argument("--asvd-search", default=",".join(SEARCHED),
                        help="models that also get ASVD's sensitivity-searched ranks ('' for none)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny models and data: a smoke test")
    parser.add_argument(
        "--out", default=None, help=f"results file (default {RESULTS}; --quick: none)"
    )
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="keep each model's rows in DIR/<model>.json and reuse them on a rerun")  # fmt: skip
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    if args.budgets is None:
        args.budgets = "0.6" if args.quick else ",".join(map(str, BUDGETS))
    try:
        budgets = [float(b) for b in args.budgets.split(",") if b]
    except ValueError:
        parser.error(f"--budgets must be comma-separated numbers in (0, 1), got {args.budgets!r}")
    if not budgets or not all(0 < b < 1 for b in budgets):
        parser.error(f"--budgets must be comma-separated numbers in (0, 1), got {args.budgets!r}")
    searched = {m for m in args.asvd_search.split(",") if m}
    if searched - set(MODELS):
        parser.error(
            f"--asvd-search: unknown {sorted(searched - set(MODELS))}; choose from {', '.join(MODELS)}"
        )
    out = args.out if args.out is not None else (None if args.quick else str(RESULTS))
    sizes = QUICK if args.quick else Sizes()
    build = {"smollm2": smollm2_task, "minilm": minilm_task}
    for name in models:
        load = os.getloadavg()[0]
        say(f"{name}: loading (load average {load:.1f} on {os.cpu_count()} cores)")
        task = build[name](sizes) if name in build else cnn_task(name, sizes)

        title = task.title + (" (--quick)" if args.quick else "")

        def report(results, done=False, *, task=task, load=load, title=title):
            body = section(task, results, budgets, load, done=done)
            if done:
                print(body, flush=True)
            if out:
                write_section(f"compress_real-{task.name}", title, body, path=out)

        resume = None
        if args.resume:
            os.makedirs(args.resume, exist_ok=True)
            resume = os.path.join(args.resume, f"{name}{'-quick' if args.quick else ''}.json")
        report(run_task(task, budgets, name in searched, report, resume=resume), done=True)
        if out:
            say(f"{name}: written to {out}")


if __name__ == "__main__":
    main()
