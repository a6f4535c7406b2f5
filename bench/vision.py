"""Vision acceptance bench: dense vs low-rank ResNet-18 trained on the offline digits.

    python -m bench.vision [--width 32] [--steps 100] [--batch 32] [--seeds 1]
                           [--budgets 0.5,0.25] [--inits random,spectral,nkp] [--warmup off,on]
                           [--quick] [--extras] [--resume] [--skip-grid] [--skip-big]

A. ResNet-18 (CIFAR stem, `--width` channels in the first stage instead of 64, so it
   trains on a small CPU) on scikit-learn's digits upscaled to 32x32, every run through
   `recipes.run` with the digits_demo recipe and the same data and schedule, for each
   of `--seeds` seeds: dense, and the "khodak" policy (every conv of the residual
   stages) under Budget(params=0.5) and Budget(params=0.25) x init random / spectral /
   NKP x hybrid warm-up off (factorized before training) / on (dense for the first
   third); `--budgets`, `--inits` and `--warmup` pick a part of that grid, and an
   init written `nkp+cal` calibrates on 256 training images (sequential calibrated NKP
   that fits each conv's output after its BatchNorm and ReLU).
   Columns: final test accuracy (mean ± sd over seeds) and its gap to dense in
   points, accuracy at the end of the warm-up and right after factorization (hybrid runs),
   parameters and conv/linear FLOPs (one image) of the whole model, train step time
   ratio (median over logging windows of the low-rank phase, against the dense run),
   and inference time ratio (jitted forward on 128 test images, dense and factorized
   timed back to back in the same process) next to the FLOP ratio.
   `--extras` runs, instead of the grid, Frobenius decay and (scaled) stable-rank
   variants with their own dense reference into a second table.
B. EfficientNet-B0 and ResNet-50 at 224x224 (1000 classes, synthetic images, batch 2):
   factorized under their policies, then one training step; the achieved params /
   FLOPs ratios and the step's loss and time.
"""

import argparse

import jax
import numpy as np

import lowrank
from bench._results import markdown_table, write_section
from bench._vision_big import part_b
from bench._vision_runs import run_all
from recipes import models
from recipes.data import DIGITS_TEST_SIZE
from recipes.run import classification_loss

BUDGETS = (0.5, 0.25)
INITS = ("random", "spectral", "nkp")
CALIBRATED = "+cal"  # an init name with this suffix calibrates on training images
CALIBRATION_IMAGES = 256


def grid(
    width: int, steps: int, batch: int, *, budgets, inits, warmups, extras: bool
) -> list[tuple[str, list[str]]]:
    """(row label, recipes.run overrides) for every run of part A; dense first. `extras`:
    instead of the grid, Frobenius decay and stable-rank (Cuttlefish) variants."""
    base = [
        f"model.width={width}",
        f"train.steps={steps}",
        f"data.batch_size={batch}",
        "train.log_every=5",
        f"train.eval_every={steps}",
        "train.progress=false",
        "optim.warmup_steps=5",
    ]
    warmup = f"factorize.warmup_steps={steps // 3}"
    runs = [("dense", [*base, "factorize.policy=none", "factorize.warmup_steps=0"])]
    if extras:
        return runs + [
            (
                "25% params, nkp, warm-up on, Frobenius decay 5e-4",
                [
                    *base,
                    "factorize.rank=params:0.25",
                    "factorize.init=nkp",
                    warmup,
                    "factorize.frobenius_decay=5e-4",
                ],
            ),
            (
                "stable rank, spectral, warm-up on",
                [*base, "factorize.rank=stable", "factorize.init=spectral", warmup],
            ),
            (
                "scaled stable rank, spectral, warm-up on",
                [*base, "factorize.rank=stable:scaled", "factorize.init=spectral", warmup],
            ),
        ]
    for budget in budgets:
        for init in inits:
            name, calibrated = init.removesuffix(CALIBRATED), init.endswith(CALIBRATED)
            for hybrid in warmups:
                label = f"{budget:.0%} params, {init}, warm-up {'on' if hybrid else 'off'}"
                runs.append(
                    (
                        label,
                        [
                            *base,
                            f"factorize.rank=params:{budget}",
                            f"factorize.init={name}",
                            f"factorize.calibration={CALIBRATION_IMAGES if calibrated else 0}",
                            warmup if hybrid else "factorize.warmup_steps=0",
                        ],
                    )
                )
    return runs


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def _rows(done: dict, dense_accs: list[float], width: int) -> list[list]:
    """Part A's table rows: the dense run, then each factorized setting."""
    dense, state = models.resnet18(10, stem="cifar", width=width, key=jax.random.key(0))
    summary = lowrank.summary(dense, example=_example(state))
    rows = [
        [
            "dense",
            _mean_sd(dense_accs),
            "",
            "",
            "",
            f"{summary.total_params:,}",
            f"{summary.flops / 1e6:.1f}M",
            1.0,
            1.0,
            1.0,
            1.0,
            "",
        ]
    ]
    for label, seeded in list(done.items())[1:]:
        report = seeded[0]["report"]
        accs = [r["accuracy"] for r in seeded]
        gap = 100 * (np.mean(dense_accs) - np.mean(accs))
        evals = [r["report"]["evals"] for r in seeded]
        before, after = (
            _mean_sd([e[k]["accuracy"] for e in evals]) if k in evals[0] else ""
            for k in ("before", "after")
        )
        train_ratio, time_ratio = seeded[0]["timings"]
        rows.append(
            [
                label,
                _mean_sd(accs),
                f"{gap:+.2f}",
                before,
                after,
                f"{report['params_low']:,} (x{report['params_ratio']:.3f})",
                f"{report['flops_low'] / 1e6:.1f}M",
                report["flops_ratio"],
                train_ratio,
                time_ratio,
                time_ratio / report["flops_ratio"],
                "yes" if time_ratio <= 1.25 * report["flops_ratio"] else "no",
            ]
        )
    return rows


def part_a(
    width: int,
    steps: int,
    batch: int,
    runs: list,
    seeds: int,
    rounds: int,
    extras: bool,
    resume: bool,
) -> str:
    """Every run of `runs` for every seed, each in its own process. Finished runs are
    logged to bench/out/vision_runs.jsonl; `resume` reuses the logged ones (same
    overrides and seed) instead of starting the log afresh."""
    done = run_all(runs, seeds=seeds, batch=batch, rounds=rounds, resume=resume)
    dense_accs = [r["accuracy"] for r in next(iter(done.values()))]
    rows = _rows(done, dense_accs, width)
    verdicts = "" if extras else "\n\n" + _verdicts(done, dense_accs)
    header = [
        "run",
        "final acc.",
        "points below dense",
        "dense acc. at warm-up end",
        "acc. right after factorizing",
        "params",
        "FLOPs",
        "FLOP ratio",
        "train step ratio",
        "inference time ratio",
        "time / FLOP ratio",
        "time <= 1.25 x FLOPs",
    ]
    runs_text = "one run each" if seeds == 1 else f"seeds 0..{seeds - 1} (mean ± sd over seeds)"
    return (
        f"ResNet-18, CIFAR stem, **width {width}** (64 is the published network), "
        f"digits upscaled to 32x32 ({1797 - DIGITS_TEST_SIZE:,} train / {DIGITS_TEST_SIZE} test "
        f"images), batch {batch}, {steps} SGD steps (cosine, lr 0.05, momentum 0.9), "
        f"{runs_text}; hybrid runs train dense for {steps // 3} steps, then factorize and "
        "continue with a fresh optimizer state. Policy khodak: all 19 convs of the residual "
        "stages are candidates; the budget is allocated across them by spectrum "
        "(lowrank.Budget), so early high-FLOP layers may stay dense. Every run trains in a "
        "process of its own. Ratios are factorized / dense; both time ratios are measured "
        "after training (seed 0's model), in turns with a dense model of the same width "
        f"({rounds} rounds of 5 calls, best round's median): train step = jitted loss + "
        f"gradient on {batch} images, "
        "inference = jitted forward on 128 images; the runs of one budget share their "
        "factorized structure, so their time ratios differ by measurement noise only "
        "(bench/model_speed.py times the 25% model layer by layer). Accuracy is on the test "
        f"images (one image = {100 / DIGITS_TEST_SIZE:.2f} points)."
        + (
            " Frobenius decay replaces plain weight decay on the factors (Khodak et al.); "
            "stable-rank runs give each layer the (scaled) stable rank of its warmed-up "
            "weights, with no budget (Cuttlefish)."
            if extras
            else ""
        )
        + "\n\n"
        + markdown_table(header, rows)
        + verdicts
    )


def _verdicts(done: dict, dense_accs: list[float]) -> str:
    """Per budget, the best setting (mean final accuracy over seeds) against the
    acceptance targets: within 0.5 points of dense, inference time <= 1.25 x FLOPs."""
    best = {}
    for label, seeded in list(done.items())[1:]:
        budget = label.split(",")[0]
        accuracy = float(np.mean([r["accuracy"] for r in seeded]))
        if budget not in best or accuracy > best[budget][1]:
            best[budget] = (label, accuracy, seeded[0])
    lines = []
    for budget, (label, accuracy, record) in best.items():
        gap = 100 * (np.mean(dense_accs) - accuracy)
        time_ratio, flop_ratio = record["timings"][1], record["report"]["flops_ratio"]
        lines.append(
            f"- {budget}: best setting `{label}`, accuracy {accuracy:.4f} vs dense "
            f"{np.mean(dense_accs):.4f}: {gap:+.2f} points below dense (within 0.5: "
            f"{'yes' if gap <= 0.5 else 'no'}); inference time ratio {time_ratio:.3f} = "
            f"{time_ratio / flop_ratio:.2f} x its FLOP ratio {flop_ratio:.3f} (<= 1.25: "
            f"{'yes' if time_ratio <= 1.25 * flop_ratio else 'no'})"
        )
    return "\n".join(lines)


def _example(state):
    """`fn(model)` running one 32x32 image (lets FLOP counts see conv output sizes)."""
    image = {"image": np.zeros((1, 3, 32, 32), np.float32), "label": np.zeros(1, np.int32)}
    return lambda m: classification_loss(m, state, image, jax.random.key(0))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=1, help="train every run with seeds 0..N-1")
    parser.add_argument(
        "--budgets", default="0.5,0.25", help="parameter fractions, comma-separated"
    )
    parser.add_argument("--inits", default=",".join(INITS), help="initializers, comma-separated")
    parser.add_argument("--warmup", default="off,on", help="hybrid warm-up settings: off, on")
    parser.add_argument("--quick", action="store_true", help="25%% budget, spectral, no warm-up")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds per structure")
    parser.add_argument(
        "--extras",
        action="store_true",
        help="Frobenius decay and stable-rank runs (own dense reference) instead of the grid",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the runs logged in bench/out/vision_runs.jsonl by an interrupted call",
    )
    parser.add_argument("--skip-grid", action="store_true")
    parser.add_argument("--skip-big", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_grid:
        budgets = (0.25,) if args.quick else tuple(float(b) for b in args.budgets.split(","))
        inits = ("spectral",) if args.quick else tuple(args.inits.split(","))
        warmups = (False,) if args.quick else tuple(w == "on" for w in args.warmup.split(","))
        runs = grid(
            args.width,
            args.steps,
            args.batch,
            budgets=budgets,
            inits=inits,
            warmups=warmups,
            extras=args.extras,
        )
        body = part_a(
            args.width,
            args.steps,
            args.batch,
            runs,
            args.seeds,
            args.rounds,
            args.extras,
            args.resume,
        )
        if args.extras:
            name, title = "vision-extras", "Vision recipes: Frobenius decay and stable ranks"
        else:
            name, title = "vision", "Vision recipes: low-rank ResNet-18 on digits"
        write_section(name, f"{title} (bench/vision.py)", body)
    if not args.skip_big:
        title = "Vision recipes: EfficientNet-B0 / ResNet-50 at 224x224 (bench/vision.py)"
        write_section("vision-224", title, part_b())


if __name__ == "__main__":
    main()
