"""Dense vs factorized inference time for an MLP and a ResNet-style CNN, next to FLOP ratios.

    python -m bench.model_speed [--repeats 30]

Both models are timed in the same process (jit, vmap over a batch, median of
repeated runs). For 3x3 convs, each lowering of the factorized conv is measured.
"""

import argparse
import statistics

import equinox as eqx
import jax
import jax.numpy as jnp

import lowrank
from bench._results import markdown_table, median_time, write_section


class ResNetish(eqx.Module):
    """A stem conv and residual pairs of 3x3 convs at one width: the conv-heavy case."""

    stem: eqx.nn.Conv2d
    blocks: list

    def __init__(self, width=64, depth=3, *, key):
        keys = jax.random.split(key, 2 * depth + 1)
        self.stem = eqx.nn.Conv2d(3, width, 3, padding=1, key=keys[0])
        self.blocks = [
            (eqx.nn.Conv2d(width, width, 3, padding=1, key=keys[2 * i + 1]),
             eqx.nn.Conv2d(width, width, 3, padding=1, key=keys[2 * i + 2]))
            for i in range(depth)
        ]  # fmt: skip

    def __call__(self, x):
        x = jax.nn.relu(self.stem(x))
        for a, b in self.blocks:
            x = jax.nn.relu(x + b(jax.nn.relu(a(x))))
        return x.mean(axis=(1, 2))


def _forward(model, x):
    return jax.vmap(model)(x)


_FORWARD = eqx.filter_jit(_forward)


def _time_pair(dense, low, x, repeats):
    """Medians of dense and low-rank, timed in alternating rounds so drift hits both."""
    dense_times, low_times = [], []
    for _ in range(repeats // 5):
        dense_times.append(median_time(_FORWARD, dense, x, repeats=5, warmup=1))
        low_times.append(median_time(_FORWARD, low, x, repeats=5, warmup=1))
    return statistics.median(dense_times), statistics.median(low_times)


def bench_mlp(repeats):
    key = jax.random.key(0)
    dense = eqx.nn.MLP(1024, 1024, 1024, 3, key=key)
    x = jax.random.normal(key, (512, 1024))
    example = jnp.zeros((1024,))
    f_dense = lowrank.summary(dense, example=example).flops
    rows = []
    for rank in (256, 128, 64, 32):
        low = lowrank.factorize(dense, rank=rank)
        t_dense, t = _time_pair(dense, low, x, repeats)
        flop_ratio = lowrank.summary(low, example=example).flops / f_dense
        ratio = t / t_dense
        rows.append(["MLP 4x(1024x1024), batch 512", rank, f"{t_dense * 1e3:.2f}", f"{t * 1e3:.2f}",
                     f"{ratio:.3f}", f"{flop_ratio:.3f}", f"{ratio / flop_ratio:.2f}"])  # fmt: skip
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
            t_dense, t = _time_pair(dense, lowrank.with_kernels(low, lowering=lowering), x, repeats)
            ratio = t / t_dense
            rows.append([f"ResNet-ish 6x conv3x3(64), 32x32, batch 32 [{lowering}]", rank,
                         f"{t_dense * 1e3:.2f}", f"{t * 1e3:.2f}", f"{ratio:.3f}",
                         f"{flop_ratio:.3f}", f"{ratio / flop_ratio:.2f}"])  # fmt: skip
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    header = ["model", "rank", "dense ms", "low-rank ms", "time ratio", "FLOP ratio", "time/FLOP"]
    rows = bench_mlp(args.repeats) + bench_cnn(args.repeats)
    table = markdown_table(header, rows)
    print(table)
    body = (
        "Median wall time of a jitted, vmapped forward pass, dense and factorized measured in the "
        "same process in alternating rounds of 5 (median of the round medians), so load drift on "
        "this shared 2-core machine hits both. `time/FLOP` is the time ratio over the FLOP ratio (1.0 = the speed-up the "
        "FLOP count promises; target <= 1.25 for linear layers at r <= min(m, n)/4). Conv rows "
        "compare the two lowerings of the factorized 3x3 conv (k x k conv to r channels, then the "
        "1x1 stage as a channel einsum or as a second lax.conv).\n\n" + table
    )
    write_section("model_speed", "Model speed: dense vs factorized (bench/model_speed.py)", body)


if __name__ == "__main__":
    main()
