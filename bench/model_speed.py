"""Dense vs factorized inference time for an MLP and a ResNet-style CNN, next to FLOP ratios.

    python -m bench.model_speed [--repeats 30]

Both models are timed in the same process (jit, vmap over a batch, median of
repeated runs). For 3x3 convs, each lowering of the factorized conv is measured.
A second table times, one at a time, each conv of ResNet-18 (CIFAR stem, width 32)
that `Budget(params=0.25)` factorizes, at the input it sees in the network: where
the whole model's time ratio comes from (bench/vision.py measures that ratio).
A third section (`--only fold` runs it alone) times ResNet-18 and MobileNetV2 at
inference, dense and factorized, before and after `recipes.models.fold_batchnorm`.
"""

import argparse
import os
import statistics

import equinox as eqx
import jax
import jax.numpy as jnp

import lowrank
from bench._results import markdown_table, median_time, write_section
from recipes import models

from ._pair_timing import ONE_THREAD_FLAGS, time_pair
from ._resnet18_speed import bench_resnet18_layers, resnet18_pair


class ResNetish(eqx.Module):
    """A stem conv and residual pairs of 3x3 convs at one width: the conv-heavy case."""

    stem: eqx.nn.Conv2d
    blocks: list

    def __init__(self, width=64, depth=3, *, key):
        keys = jax.random.split(key, 2 * depth + 1)
        self.stem = eqx.nn.Conv2d(3, width, 3, padding=1, key=keys[0])
        self.blocks = [
            (
                eqx.nn.Conv2d(width, width, 3, padding=1, key=keys[2 * i + 1]),
                eqx.nn.Conv2d(width, width, 3, padding=1, key=keys[2 * i + 2]),
            )
            for i in range(depth)
        ]

    def __call__(self, x):
        x = jax.nn.relu(self.stem(x))
        for a, b in self.blocks:
            x = jax.nn.relu(x + b(jax.nn.relu(a(x))))
        return x.mean(axis=(1, 2))


def _row(name: str, rank: int, t_dense: float, t: float, flop_ratio: float) -> list:
    """A table row: the model, the rank, both times in ms, the time and FLOP ratios, and
    how far the time ratio is off the FLOP ratio."""
    ratio = t / t_dense
    return [
        name,
        rank,
        f"{t_dense * 1e3:.2f}",
        f"{t * 1e3:.2f}",
        f"{ratio:.3f}",
        f"{flop_ratio:.3f}",
        f"{ratio / flop_ratio:.2f}",
    ]


def bench_mlp(repeats):
    key = jax.random.key(0)
    dense = eqx.nn.MLP(1024, 1024, 1024, 3, key=key)
    x = jax.random.normal(key, (512, 1024))
    example = jnp.zeros((1024,))
    f_dense = lowrank.summary(dense, example=example).flops
    rows = []
    for rank in (256, 128, 64, 32):
        low = lowrank.factorize(dense, rank=rank)
        t_dense, t = time_pair(dense, low, x, repeats=repeats)
        flop_ratio = lowrank.summary(low, example=example).flops / f_dense
        rows.append(_row("MLP 4x(1024x1024), batch 512", rank, t_dense, t, flop_ratio))
    return rows


def bench_cnn(repeats):
    key = jax.random.key(0)
    dense = ResNetish(key=key)
    x = jax.random.normal(key, (32, 3, 32, 32))
    example = jnp.zeros((3, 32, 32))
    f_dense = lowrank.summary(dense, example=example).flops
    rows = []
    for rank in (32, 16, 8):
        low = lowrank.factorize(dense, rank=rank, exclude=["stem"])
        flop_ratio = lowrank.summary(low, example=example).flops / f_dense
        for lowering in ("einsum", "conv"):
            t_dense, t = time_pair(
                dense, lowrank.with_kernels(low, lowering=lowering), x, repeats=repeats
            )
            name = f"ResNet-ish 6x conv3x3(64), 32x32, batch 32 [{lowering}]"
            rows.append(_row(name, rank, t_dense, t, flop_ratio))
    return rows


def _fold_models(name):
    """(dense, state, factorized, image shape) at Budget(params=0.25)."""
    if name == "ResNet-18":
        dense, state, low, _, _ = resnet18_pair()
        return dense, state, low, (3, 32, 32)
    dense, state = eqx.nn.make_with_state(models.MobileNetV2)(num_classes=10, key=jax.random.key(0))
    return dense, state, lowrank.factorize(dense, rank=lowrank.Budget(params=0.25)), (3, 64, 64)


def bench_folding(repeats, batch=32):
    """Dense and factorized inference, unfolded and with BatchNorm folded, in alternating
    rounds; time and FLOP ratios against the unfolded dense model."""
    forward = eqx.filter_jit(
        lambda m, s, x: jax.vmap(lambda x: m(x, s, inference=True)[0], axis_name=models.BATCH_AXIS)(
            x
        )
    )
    rows = []
    for name in ("ResNet-18", "MobileNetV2"):
        dense, state, low, shape = _fold_models(name)
        variants = {
            "dense": dense,
            "dense folded": models.fold_batchnorm(dense, state),
            "factorized": low,
            "factorized folded": models.fold_batchnorm(low, state),
        }
        x = jax.random.normal(jax.random.key(1), (batch, *shape))
        times = {k: [] for k in variants}
        for _ in range(max(1, repeats // 5)):
            for k, m in variants.items():
                times[k].append(median_time(forward, m, state, x, repeats=5, warmup=1))
        med = {k: statistics.median(v) for k, v in times.items()}
        example = lambda m, shape=shape, state=state: eqx.nn.inference_mode(m)(
            jnp.zeros(shape), state
        )
        flops = {
            k: lowrank.summary(variants[k], example=example).flops for k in ("dense", "factorized")
        }
        flop_ratio = flops["factorized"] / flops["dense"]
        for k in variants:
            ref = "dense folded" if k.endswith("folded") else "dense"
            ratio = med[k] / med[ref]
            f_ratio = flop_ratio if k.startswith("factorized") else 1.0
            rows.append(
                [
                    name,
                    k,
                    f"{med[k] * 1e3:.2f}",
                    f"{ratio:.3f}",
                    f"{f_ratio:.3f}",
                    f"{ratio / f_ratio:.2f}",
                    f"{med[k] / med['dense']:.3f}",
                ]
            )
    return rows


def write_folding(repeats):
    header = [
        "model",
        "variant",
        "ms",
        "time ratio (vs dense, same folding)",
        "FLOP ratio",
        "time/FLOP",
        "time vs unfolded dense",
    ]
    table = markdown_table(header, bench_folding(repeats))
    print(table)
    body = (
        "Inference forward (BatchNorm at running statistics) of a batch of 32 images, jitted and "
        "vmapped: ResNet-18 (CIFAR stem, width 32, 32x32 images, khodak policy) and MobileNetV2 "
        "(10 classes, 64x64 images), each factorized at Budget(params=0.25), before and after "
        "`recipes.models.fold_batchnorm` (BatchNorm folded into the conv before it, or into a "
        "factorized conv's 1x1 stage). Four variants timed in alternating rounds of 5 (median of "
        "the round medians). Time ratios compare with the dense model with the same folding; "
        "FLOP ratios are conv/linear FLOPs (`lowrank.summary`). Old vision target: "
        "time/FLOP <= 1.25 at 25% params. Load average at the end: "
        + ", ".join(f"{x:.1f}" for x in os.getloadavg())
        + ".\n\n"
        + table
    )
    write_section(
        "model_speed_fold",
        "Model speed with folded BatchNorm (bench/model_speed.py --only fold)",
        body,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--only",
        choices=["all", "fold"],
        default="all",
        help="fold: only the BatchNorm-folding section",
    )
    args = parser.parse_args()
    if args.only == "fold":
        write_folding(args.repeats)
        return
    header = ["model", "rank", "dense ms", "low-rank ms", "time ratio", "FLOP ratio", "time/FLOP"]
    rows = bench_mlp(args.repeats) + bench_cnn(args.repeats)
    table = markdown_table(header, rows)
    print(table)
    layer_header = [
        "ResNet-18 conv",
        "shape",
        "input",
        "rank",
        "dense ms",
        "low-rank ms",
        "time ratio",
        "FLOP ratio",
        "time/FLOP",
    ]
    layer_table = markdown_table(layer_header, bench_resnet18_layers(args.repeats))
    print(layer_table)
    body = (
        "Median wall time of a jitted, vmapped forward pass, dense and factorized measured in the "
        "same process in alternating rounds of 5 (median of the round medians), so load drift on "
        "this shared 2-core machine hits both. `time/FLOP` is the time ratio over the FLOP ratio (1.0 = the speed-up the "
        "FLOP count promises; target <= 1.25 for linear layers at r <= min(m, n)/4). Conv rows "
        "compare the two lowerings of the factorized 3x3 conv (k x k conv to r channels, then the "
        "1x1 stage as a channel einsum or as a second lax.conv).\n\n"
        + table
        + "\n\nResNet-18 (CIFAR stem, width 32, as in bench/vision.py), factorized under "
        "Budget(params=0.25) with the khodak policy: each factorized conv timed alone on a batch "
        "of 128 inputs of the size it sees in the network, then the whole model's inference "
        "forward (BatchNorm at running statistics) on 128 images, on all cores and, in a "
        f"fresh process, on one thread (XLA_FLAGS='{ONE_THREAD_FLAGS}'); 'rest of the model' is "
        "the dense model's time outside the factorized convs.\n\n" + layer_table
    )
    write_section("model_speed", "Model speed: dense vs factorized (bench/model_speed.py)", body)
    write_folding(args.repeats)


if __name__ == "__main__":
    main()
