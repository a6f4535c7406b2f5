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
import multiprocessing
import os
import statistics
from concurrent.futures import ProcessPoolExecutor

import equinox as eqx
import jax
import jax.numpy as jnp

import lowrank
from bench._results import markdown_table, median_time, write_section
from recipes import models
from recipes.policy import POLICY_TARGETS, module_at
from recipes.run import classification_eval


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


def _forward(model, x):
    return jax.vmap(model)(x)


_FORWARD = eqx.filter_jit(_forward)
ONE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _time_pair(dense, low, *args, repeats, forward=_FORWARD):
    """Medians of `forward(model, *args)` for dense and low-rank, timed in alternating
    rounds so drift hits both."""
    dense_times, low_times = [], []
    for _ in range(repeats // 5):
        dense_times.append(median_time(forward, dense, *args, repeats=5, warmup=1))
        low_times.append(median_time(forward, low, *args, repeats=5, warmup=1))
    return statistics.median(dense_times), statistics.median(low_times)


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
        t_dense, t = _time_pair(dense, low, x, repeats=repeats)
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
            t_dense, t = _time_pair(
                dense, lowrank.with_kernels(low, lowering=lowering), x, repeats=repeats
            )
            name = f"ResNet-ish 6x conv3x3(64), 32x32, batch 32 [{lowering}]"
            rows.append(_row(name, rank, t_dense, t, flop_ratio))
    return rows


def _resnet18_input_side(path: str, image: int = 32) -> int:
    """Spatial size of the input that the conv at `path` sees in the CIFAR-stem ResNet-18:
    stage s runs at image / 2**s; the first block's conv1 and shortcut of stages 1..3
    still see the previous stage's resolution (they stride by 2)."""
    _, stage, _, block, name, *_ = path.split(".")
    stage, block = int(stage), int(block)
    strided = stage > 0 and block == 0 and name in ("conv1", "downsample")
    return image >> (stage - 1 if strided else stage)


def _resnet18_pair():
    """ResNet-18 (CIFAR stem, width 32), its BatchNorm state, the same model factorized
    under the khodak policy at Budget(params=0.25), the plan, and a FLOPs example."""
    dense, state = models.resnet18(10, stem="cifar", width=32, key=jax.random.key(0))
    example = lambda m: eqx.nn.inference_mode(m)(jnp.zeros((3, 32, 32)), state)
    low, plan = lowrank.factorize(
        dense,
        rank=lowrank.Budget(params=0.25),
        target=POLICY_TARGETS["khodak"][1],
        example=example,
        return_plan=True,
    )
    return dense, state, low, plan, example


def resnet18_whole_model(repeats: int, batch: int = 128) -> tuple[float, float, float]:
    """(dense s, low-rank s, FLOP ratio) of the inference forward on `batch` images."""
    dense, state, low, _, example = _resnet18_pair()
    images = {
        "image": jax.random.normal(jax.random.key(1), (batch, 3, 32, 32)),
        "label": jnp.zeros(batch, jnp.int32),
    }
    forward = eqx.filter_jit(lambda m, s, b: classification_eval(eqx.nn.inference_mode(m), s, b))
    t_dense, t = _time_pair(dense, low, state, images, repeats=repeats, forward=forward)
    flop_ratio = (
        lowrank.summary(low, example=example).flops / lowrank.summary(dense, example=example).flops
    )
    return t_dense, t, flop_ratio


def _on_one_thread(fn, *args):
    """fn(*args) in a fresh process whose XLA runs on a single CPU thread."""
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} {ONE_THREAD_FLAGS}".strip()
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    finally:
        os.environ["XLA_FLAGS"] = flags


def bench_resnet18_layers(repeats, batch=128):
    """Each conv factorized by Budget(params=0.25) under the khodak policy, alone; then
    the whole model, on all cores and on one thread."""
    dense, _, _, plan, _ = _resnet18_pair()
    rows, dense_total, low_total = [], 0.0, 0.0
    for lp in plan.factorized:
        conv = module_at(dense, lp.path)
        side = _resnet18_input_side(lp.path)
        x = jax.random.normal(jax.random.key(1), (batch, conv.in_channels, side, side))
        low_conv = lowrank.factorize(conv, rank=lp.rank)
        t_dense, t = _time_pair(conv, low_conv, x, repeats=repeats)
        dense_total, low_total = dense_total + t_dense, low_total + t
        flop_ratio = lp.flops_after / lp.flops_before
        rows.append(
            [
                lp.path,
                f"{conv.out_channels}x{conv.in_channels}x{'x'.join(map(str, conv.kernel_size))}",
                f"{side}x{side}",
                lp.rank,
                f"{t_dense * 1e3:.2f}",
                f"{t * 1e3:.2f}",
                f"{t / t_dense:.3f}",
                f"{flop_ratio:.3f}",
                f"{t / t_dense / flop_ratio:.2f}",
            ]
        )
    rows.append(
        [
            "all factorized convs",
            "",
            "",
            "",
            f"{dense_total * 1e3:.2f}",
            f"{low_total * 1e3:.2f}",
            f"{low_total / dense_total:.3f}",
            "",
            "",
        ]
    )
    whole = resnet18_whole_model(repeats, batch)
    rows.append(
        [
            "rest of the model (whole - factorized convs)",
            "",
            "",
            "",
            f"{(whole[0] - dense_total) * 1e3:.2f}",
            "",
            "",
            "",
            "",
        ]
    )
    for label, (t_dense, t, flop_ratio) in [
        (f"whole model, {os.cpu_count()} cores", whole),
        ("whole model, 1 thread", _on_one_thread(resnet18_whole_model, repeats, batch)),
    ]:
        rows.append(
            [
                label,
                "",
                "32x32",
                "",
                f"{t_dense * 1e3:.2f}",
                f"{t * 1e3:.2f}",
                f"{t / t_dense:.3f}",
                f"{flop_ratio:.3f}",
                f"{t / t_dense / flop_ratio:.2f}",
            ]
        )
    return rows


def _fold_models(name):
    """(dense, state, factorized, image shape) at Budget(params=0.25)."""
    if name == "ResNet-18":
        dense, state, low, _, _ = _resnet18_pair()
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
