"""Real pretrained models compressed by the peers and by lowrank, every row measured in
the same run on the same data (issue 12's acceptance tables).

    python -m bench.compress_real [--models smollm2,mobilenet_v2,efficientnet_lite0,minilm]
                                  [--budgets 0.8,0.6] [--asvd-search MODELS] [--quick]
                                  [--no-allocators] [--resume DIR] [--out bench/RESULTS.md]

Per model and parameter budget (the fraction of the selected layers' parameters kept):
- peers (bench/peers.py), fitted on the dense model's inputs (sequential=False) with the
  papers' uniform ranks, int(m·n·ratio / (m + n)) per layer: plain truncated SVD,
  SVD-LLM (W) (truncation-aware whitening) and ASVD (α = 0.5); with `--asvd-search`,
  also ASVD with its sensitivity-based ranks (the sensitivity is measured once per
  model and its time is counted in that row at every budget);
- ours: `lowrank.factorize(rank=Budget(params=ratio), init="whitened" | "nkp")` with
  the default sequential calibration, the activation after each layer given; and
  (unless `--no-allocators`) whitened with the same calibration but other rank
  allocators: `Budget(params=ratio, by="weights")` (weight spectra) and `by="uniform"`
  (issue 13's comparison of allocators), and nkp with `by="uniform"`. The NKP rows run
  last: the slowest.
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
Modules: bench/_real_tasks.py (the models, data and scores), bench/_real_runs.py (the
methods, the rows, --resume), bench/_real_tables.py (the table and the verdicts).
"""

import argparse
import os
import re

from bench._real_runs import run_task, say
from bench._real_tables import section
from bench._real_tasks import QUICK, Sizes, cnn_task, minilm_task, smollm2_task
from bench._results import RESULTS, write_section

MODELS = ("smollm2", "mobilenet_v2", "efficientnet_lite0", "minilm")
BUDGETS = (0.8, 0.6)
SEARCHED = ("mobilenet_v2", "efficientnet_lite0", "minilm")  # ASVD search by default


def _arguments(argv):
    """The parsed command line, with --models, --budgets and --asvd-search checked and
    split: (args, models, budgets, searched models)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    default_budgets = ",".join(map(str, BUDGETS))
    parser.add_argument(
        "--budgets",
        default=None,
        help=f"parameter fractions kept (default {default_budgets}; --quick: 0.6)",
    )
    parser.add_argument(
        "--asvd-search",
        default=",".join(SEARCHED),
        help="models that also get ASVD's sensitivity-searched ranks ('' for none)",
    )
    parser.add_argument(
        "--allocators",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also ours: whitened with weight-spectrum and uniform ranks, nkp with uniform ranks (default on)",
    )
    parser.add_argument(
        "--only",
        default=None,
        metavar="REGEX",
        help="measure only the rows whose label matches REGEX (rows from --resume are kept)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny models and data: a smoke test")
    parser.add_argument(
        "--out", default=None, help=f"results file (default {RESULTS}; --quick: none)"
    )
    parser.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="keep each model's rows in DIR/<model>.json and reuse them on a rerun",
    )
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    if args.budgets is None:
        args.budgets = "0.6" if args.quick else default_budgets
    bad = f"--budgets must be comma-separated numbers in (0, 1), got {args.budgets!r}"
    try:
        budgets = [float(b) for b in args.budgets.split(",") if b]
    except ValueError:
        parser.error(bad)
    if not budgets or not all(0 < b < 1 for b in budgets):
        parser.error(bad)
    if args.only is not None:
        try:
            args.only = re.compile(args.only)
        except re.error as e:
            parser.error(f"--only: not a regular expression ({e}): {args.only!r}")
    searched = {m for m in args.asvd_search.split(",") if m}
    if searched - set(MODELS):
        parser.error(
            f"--asvd-search: unknown {sorted(searched - set(MODELS))}; choose from {', '.join(MODELS)}"
        )
    return args, models, budgets, searched


def main(argv=None) -> None:
    args, models, budgets, searched = _arguments(argv)
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
        results = run_task(
            task,
            budgets,
            name in searched,
            report,
            resume=resume,
            allocators=args.allocators,
            only=args.only,
        )
        report(results, done=True)
        if out:
            say(f"{name}: written to {out}")


if __name__ == "__main__":
    main()
