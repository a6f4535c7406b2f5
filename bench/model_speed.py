"""Dense vs factorized inference time for an MLP and a ResNet-style CNN, next to FLOP ratios.

    python -m bench.model_speed [--repeats 30] [--options default,xnnpack,onednn,one_thread]
        [--only all|models|layers|fold] [--quick] [--results PATH | --no-write]

Dense and factorized models are timed in the same process (jit, vmap over a batch,
alternating rounds, median of repeated runs). For 3x3 convs, each lowering of the
factorized conv is measured. The MLP and CNN table (`--only models`) is measured once per
XLA:CPU option set (`--options`, default all four of bench/_xla_options.py), each in a
fresh subprocess with that option's XLA_FLAGS in its environment (the library never sets
flags: set them the same way, e.g. `XLA_FLAGS=--xla_cpu_use_xnnpack=true python ...`);
an option set this jax rejects is reported as not run. A second section (`--only
layers`) times, one at a time, each conv of ResNet-18 (CIFAR stem, width 32) that
`Budget(params=0.25)` factorizes, at the input it sees in the network: where the whole
model's time ratio comes from (bench/vision.py measures that ratio). A third (`--only
fold`) times ResNet-18 and MobileNetV2 at inference, dense and factorized, before and
after `recipes.models.fold_batchnorm`. `--quick`: a tiny MLP and CNN, one round of 5 (a
smoke run of the option plumbing, with `--only models`).
"""

import argparse
import json
import os
import statistics
import sys

import equinox as eqx
import jax
import jax.numpy as jnp

import lowrank
from bench._results import RESULTS, markdown_table, median_time, write_section
from bench._xla_options import OPTIONS, how_to_set, option_names, run_child
from recipes import models

from ._pair_timing import ONE_THREAD_FLAGS, time_pair
from ._resnet18_speed import bench_resnet18_layers, resnet18_pair

# (MLP width, MLP batch, CNN width, CNN batch, CNN image side)
SIZES = {"full": (1024, 512, 64, 32, 32), "quick": (64, 8, 8, 2, 8)}


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


def bench_mlp(repeats, width=1024, batch=512):
    key = jax.random.key(0)
    dense = eqx.nn.MLP(width, width, width, 3, key=key)
    x = jax.random.normal(key, (batch, width))
    example = jnp.zeros((width,))
    f_dense = lowrank.summary(dense, example=example).flops
    rows = []
    for rank in (width // 4, width // 8, width // 16, width // 32):
        low = lowrank.factorize(dense, rank=rank)
        t_dense, t = time_pair(dense, low, x, repeats=repeats)
        flop_ratio = lowrank.summary(low, example=example).flops / f_dense
        rows.append(_row(f"MLP 4x({width}x{width}), batch {batch}", rank, t_dense, t, flop_ratio))
    return rows


def bench_cnn(repeats, width=64, batch=32, side=32):
    key = jax.random.key(0)
    dense = ResNetish(width, key=key)
    x = jax.random.normal(key, (batch, 3, side, side))
    example = jnp.zeros((3, side, side))
    f_dense = lowrank.summary(dense, example=example).flops
    rows = []
    for rank in (width // 2, width // 4, width // 8):
        low = lowrank.factorize(dense, rank=rank, exclude=["stem"])
        flop_ratio = lowrank.summary(low, example=example).flops / f_dense
        for lowering in ("einsum", "conv"):
            t_dense, t = time_pair(
                dense, lowrank.with_kernels(low, lowering=lowering), x, repeats=repeats
            )
            name = f"ResNet-ish 6x conv3x3({width}), {side}x{side}, batch {batch} [{lowering}]"
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


def _write(args, name: str, title: str, body: str) -> None:
    """Print a section's body and, unless --no-write, write it into args.results."""
    print(body, flush=True)
    if not args.no_write:
        write_section(name, title, body, path=args.results)


def _child(repeats: int, quick: bool) -> dict:
    """The MLP and CNN rows measured in this process, under its XLA_FLAGS; JSON-able."""
    mlp_width, mlp_batch, cnn_width, cnn_batch, side = SIZES["quick" if quick else "full"]
    rows = bench_mlp(repeats, mlp_width, mlp_batch) + bench_cnn(repeats, cnn_width, cnn_batch, side)
    return {"rows": rows, "xla_flags": os.environ.get("XLA_FLAGS", ""), "load": os.getloadavg()}


def write_models(args):
    """The MLP and CNN table, one child process per option set in args.options."""
    header = ["XLA options", "model", "rank", "dense ms", "low-rank ms", "time ratio"]
    header += ["FLOP ratio", "time/FLOP"]
    rows, notes = [], []
    for name in args.options:
        print(f"[model_speed] options {name}: {how_to_set(name)}", file=sys.stderr, flush=True)
        argv = ["-m", "bench.model_speed", "--child", "--repeats", str(args.repeats)]
        res = run_child(OPTIONS[name], argv + (["--quick"] if args.quick else []))
        if "error" in res:
            rows.append([name, "not run: " + res["error"].replace("|", "/"), *[""] * 6])
            notes.append(f"- `{name}`: {how_to_set(name)}; not run, {res['error']}")
            continue
        rows += [[name, *row] for row in res["rows"]]
        load = ", ".join(f"{x:.1f}" for x in res["load"])
        notes.append(
            f"- `{name}`: {how_to_set(name)} (the child ran with XLA_FLAGS="
            f"`{res['xla_flags']}`); load average at the end {load}"
        )
    body = (
        "Median wall time of a jitted, vmapped forward pass, dense and factorized measured in the "
        "same process in alternating rounds of 5 (median of the round medians), so load drift on "
        "this shared 2-core machine hits both. `time/FLOP` is the time ratio over the FLOP ratio "
        "(1.0 = the speed-up the FLOP count promises; target <= 1.25 for linear layers at "
        "r <= min(m, n)/4). Conv rows compare the two lowerings of the factorized 3x3 conv (k x k "
        "conv to r channels, then the 1x1 stage as a channel einsum or as a second lax.conv). "
        "Each XLA:CPU option set ran in a fresh process with its XLA_FLAGS in the environment; "
        "the library never sets flags: to use one, set XLA_FLAGS the same way before Python "
        "starts (below). An option set this jax rejects is listed as not run.\n\n"
        + markdown_table(header, rows)
        + "\n\n"
        + "\n".join(notes)
    )
    _write(args, "model_speed", "Model speed: dense vs factorized (bench/model_speed.py)", body)


def write_layers(args):
    header = ["ResNet-18 conv", "shape", "input", "rank", "dense ms", "low-rank ms"]
    header += ["time ratio", "FLOP ratio", "time/FLOP"]
    body = (
        "ResNet-18 (CIFAR stem, width 32, as in bench/vision.py), factorized under "
        "Budget(params=0.25) with the khodak policy: each factorized conv timed alone on a batch "
        "of 128 inputs of the size it sees in the network, then the whole model's inference "
        "forward (BatchNorm at running statistics) on 128 images, on all cores and, in a "
        f"fresh process, on one thread (XLA_FLAGS='{ONE_THREAD_FLAGS}'); 'rest of the model' is "
        "the dense model's time outside the factorized convs.\n\n"
        + markdown_table(header, bench_resnet18_layers(args.repeats))
    )
    title = "Model speed: ResNet-18 conv by conv (bench/model_speed.py --only layers)"
    _write(args, "model_speed_layers", title, body)


def write_folding(args):
    header = [
        "model",
        "variant",
        "ms",
        "time ratio (vs dense, same folding)",
        "FLOP ratio",
        "time/FLOP",
        "time vs unfolded dense",
    ]
    table = markdown_table(header, bench_folding(args.repeats))
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
    title = "Model speed with folded BatchNorm (bench/model_speed.py --only fold)"
    _write(args, "model_speed_fold", title, body)


def main(argv: list[str] | None = None) -> None:
    """Run the sections named by --only and write each into its RESULTS.md section.

    Args:
        argv: the command line (default sys.argv[1:]).
    """
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed runs (rounds of 5)")
    parser.add_argument("--options", type=option_names, default=",".join(OPTIONS))
    parser.add_argument("--only", choices=["all", "models", "layers", "fold"], default="all")
    parser.add_argument("--quick", action="store_true", help="tiny MLP and CNN, one round")
    parser.add_argument("--results", default=RESULTS, help="write here instead of RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 5
    if args.child:
        print(json.dumps(_child(args.repeats, args.quick)))
        return
    for only, write in (
        ("models", write_models),
        ("layers", write_layers),
        ("fold", write_folding),
    ):
        if args.only in ("all", only):
            write(args)


if __name__ == "__main__":
    main()
