"""Vision acceptance bench: dense vs low-rank ResNet-18 trained on the offline digits.

    python -m bench.vision [--width 32] [--steps 100] [--batch 32] [--quick] [--extras]
                           [--skip-grid] [--skip-big]

A. ResNet-18 (CIFAR stem, `--width` channels in the first stage instead of 64, so it
   trains on a small CPU) on scikit-learn's digits upscaled to 32x32, every run through
   `recipes.run` with the digits_demo recipe and the same data, schedule and seed:
   dense, and the "khodak" policy (every conv of the residual stages) under
   Budget(params=0.5) and Budget(params=0.25) x init random / spectral / NKP x
   hybrid warm-up off (factorized before training) / on (dense for the first third).
   Columns: final test accuracy, accuracy right after factorization (hybrid runs),
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
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import lowrank
from bench._results import markdown_table, write_section
from recipes import models
from recipes._factorize_policy import apply_policy
from recipes.config import (
    Config,
    FactorizeConfig,
    ImageModelConfig,
    OptimConfig,
    TrainConfig,
    load_config,
)
from recipes.run import classification_loss, run
from recipes._report import step_seconds
from recipes.data import DIGITS_TEST_SIZE
from recipes.train import make_optimizer, train

BUDGETS = (0.5, 0.25)
INITS = ("random", "spectral", "nkp")


def grid(width: int, steps: int, batch: int, quick: bool, extras: bool) -> list[tuple[str, list[str]]]:
    """(row label, recipes.run overrides) for every run of part A; dense first. `extras`:
    instead of the grid, Frobenius decay and stable-rank (Cuttlefish) variants."""
    base = [
        f"model.width={width}", f"train.steps={steps}", f"data.batch_size={batch}",
        "train.log_every=5", f"train.eval_every={steps}", "train.progress=false",
        "optim.warmup_steps=5",
    ]  # fmt: skip
    warmup = f"factorize.warmup_steps={steps // 3}"
    runs = [("dense", [*base, "factorize.policy=none", "factorize.warmup_steps=0"])]
    if extras:
        return runs + [
            ("25% params, nkp, warm-up on, Frobenius decay 5e-4",
             [*base, "factorize.rank=params:0.25", "factorize.init=nkp", warmup,
              "factorize.frobenius_decay=5e-4"]),
            ("stable rank, spectral, warm-up on",
             [*base, "factorize.rank=stable", "factorize.init=spectral", warmup]),
            ("scaled stable rank, spectral, warm-up on",
             [*base, "factorize.rank=stable:scaled", "factorize.init=spectral", warmup]),
        ]  # fmt: skip
    budgets, inits = ((0.25,), ("spectral",)) if quick else (BUDGETS, INITS)
    for budget in budgets:
        for init in inits:
            for hybrid in (False, True):
                label = f"{budget:.0%} params, {init}, warm-up {'on' if hybrid else 'off'}"
                runs.append((label, [
                    *base, f"factorize.rank=params:{budget}", f"factorize.init={init}",
                    warmup if hybrid else "factorize.warmup_steps=0",
                ]))  # fmt: skip
    return runs


def part_a(width: int, steps: int, batch: int, quick: bool, extras: bool) -> str:
    rows, dense = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, overrides) in enumerate(grid(width, steps, batch, quick, extras)):
            start = time.perf_counter()
            config = load_config("digits_demo", [*overrides, f"train.out_dir={Path(tmp) / str(i)}"])
            result, report = run(config)
            final = [r for r in result.history if r["split"] == "eval"][-1]
            step_s = step_seconds(result.history, batch, after=config.factorize.warmup_steps)
            if report is None:
                summary = lowrank.summary(result.model, example=_example(result.model, result.state))
                dense = {"params": summary.total_params, "flops": summary.flops, "step_s": step_s}
                rows.append([label, f"{final['accuracy']:.4f}", "", f"{summary.total_params:,}",
                             f"{summary.flops / 1e6:.1f}M", 1.0, 1.0, 1.0, 1.0, ""])  # fmt: skip
            else:
                after = report["evals"].get("after", {}).get("accuracy")
                ratio = report["inference_time_ratio"] / report["flops_ratio"]
                rows.append([
                    label, f"{final['accuracy']:.4f}", "" if after is None else f"{after:.4f}",
                    f"{report['params_low']:,} (x{report['params_ratio']:.3f})",
                    f"{report['flops_low'] / 1e6:.1f}M", report["flops_ratio"],
                    step_s / dense["step_s"], report["inference_time_ratio"], ratio,
                    "yes" if ratio <= 1.25 else "no",
                ])  # fmt: skip
            print(f"[{i + 1}] {label}: accuracy {final['accuracy']:.4f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)  # fmt: skip
    header = [
        "run", "final acc.", "acc. right after factorizing", "params", "FLOPs", "FLOP ratio",
        "train step ratio", "inference time ratio", "time / FLOP ratio", "<= 1.25",
    ]  # fmt: skip
    return (
        f"ResNet-18, CIFAR stem, **width {width}** (64 is the published network), "
        f"digits upscaled to 32x32 ({1797 - DIGITS_TEST_SIZE:,} train / {DIGITS_TEST_SIZE} test "
        f"images), batch {batch}, "
        f"{steps} SGD steps (cosine, lr 0.05), seed 0; hybrid runs train dense for "
        f"{steps // 3} steps. Policy khodak: all 19 convs of the residual stages are "
        "candidates; the budget is allocated across them by spectrum (lowrank.Budget), so "
        "early high-FLOP layers may stay dense. Ratios are factorized / dense."
        + (" Frobenius decay replaces plain weight decay on the factors (Khodak et al.); "
           "stable-rank runs give each layer the (scaled) stable rank of its warmed-up "
           "weights, with no budget (Cuttlefish)." if extras else "")
        + "\n\n" + markdown_table(header, rows)
    )


def _example(model, state):
    """`fn(model)` running one 32x32 image (lets FLOP counts see conv output sizes)."""
    image = {"image": np.zeros((1, 3, 32, 32), np.float32), "label": np.zeros(1, np.int32)}
    return lambda m: classification_loss(m, state, image, jax.random.key(0))


def part_b() -> str:
    rows = []
    setups = [
        ("efficientnet_b0", "efficientnet", "nkp", lambda k: models.efficientnet_b0(1000, key=k)),
        ("resnet50", "khodak", "spectral", lambda k: models.resnet50(1000, stem="imagenet", key=k)),
    ]
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(2, 3, 224, 224)).astype(np.float32),
        "label": rng.integers(0, 1000, 2).astype(np.int32),
    }
    for name, policy, init, make in setups:
        model, state = make(jax.random.key(0))
        config = Config(
            name=f"{name}_224",
            model=ImageModelConfig(name=name, stem="imagenet"),
            factorize=FactorizeConfig(policy=policy, rank="params:0.5", init=init),
        )
        one = {k: v[:1] for k, v in batch.items()}
        example = lambda m: classification_loss(m, state, one, jax.random.key(0))  # noqa: E731
        start = time.perf_counter()
        low, plan = apply_policy(model, config, example=example)
        factorize_s = time.perf_counter() - start
        dense_sum, low_sum = lowrank.summary(model, example=example), lowrank.summary(low, example=example)
        optimizer, schedule = make_optimizer(OptimConfig(), 1)
        start = time.perf_counter()
        result = train(
            low, state, loss_fn=classification_loss, optimizer=optimizer, schedule=schedule,
            train_data=lambda step: iter(lambda: batch, None),
            config=TrainConfig(steps=1, log_every=1, out_dir="", progress=False),
        )  # fmt: skip
        step_s = time.perf_counter() - start
        loss = result.history[-1]["loss"]
        totals = plan.totals()
        print(f"{name}: {len(plan.factorized)} layers factorized, params x"
              f"{low_sum.total_params / dense_sum.total_params:.3f}, FLOPs x"
              f"{low_sum.flops / dense_sum.flops:.3f}, loss {loss:.3f}", flush=True)  # fmt: skip
        rows.append([
            name, policy, init, f"{len(plan.factorized)}/{len(plan.layers)}",
            totals["params_after"] / totals["params_before"],
            f"{dense_sum.total_params:,} -> {low_sum.total_params:,}",
            low_sum.total_params / dense_sum.total_params,
            f"{dense_sum.flops / 1e9:.2f}G -> {low_sum.flops / 1e9:.2f}G",
            low_sum.flops / dense_sum.flops, f"{loss:.3f}", f"{factorize_s:.1f}", f"{step_s:.1f}",
        ])  # fmt: skip
    header = [
        "model", "policy", "init", "factorized", "selected params ratio", "model params",
        "params ratio", "FLOPs (one image)", "FLOP ratio", "loss after 1 step",
        "factorize s", "1 step s (incl. compile)",
    ]  # fmt: skip
    return (
        "224x224, 1000 classes, Budget(params=0.5) of each policy's layers, one SGD step "
        "on 2 synthetic images (a smoke test that the factorized models train, not a "
        "quality number).\n\n" + markdown_table(header, rows)
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="one budget and init only")
    parser.add_argument(
        "--extras", action="store_true",
        help="Frobenius decay and stable-rank runs (with their own dense reference) instead of the grid",
    )  # fmt: skip
    parser.add_argument("--skip-grid", action="store_true")
    parser.add_argument("--skip-big", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_grid:
        body = part_a(args.width, args.steps, args.batch, args.quick, args.extras)
        if args.extras:
            name, title = "vision-extras", "Vision recipes: Frobenius decay and stable ranks"
        else:
            name, title = "vision", "Vision recipes: low-rank ResNet-18 on digits"
        write_section(name, f"{title} (bench/vision.py)", body)
    if not args.skip_big:
        write_section("vision-224", "Vision recipes: EfficientNet-B0 / ResNet-50 at 224x224 (bench/vision.py)", part_b())


if __name__ == "__main__":
    main()
