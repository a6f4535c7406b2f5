"""Fused factored matmul vs XLA: correctness, a roofline model, and measured medians.

    python -m bench.kernels            # checks, then the full grid
    python -m bench.kernels --quick    # checks, then a smaller grid
    python -m bench.kernels --check    # correctness checks only

Grid: M in {1, 16, 4096, 16384}, K = N in {1024, 4096}, r in {16, 64, 256}, forward
and forward+backward (vjp w.r.t. every input), bias + gelu epilogue. Paths: dense
act(x @ W + bias), XLA act((x @ a) @ b + bias), the fused Pallas kernels, and
`impl="auto"`. Pallas and auto are timed on GPU/TPU only; on CPU the kernels run in
interpret mode, which says nothing about speed, so only their correctness is checked.

Roofline: FLOPs = 2·M·r·(K + N) forward (2·M·K·N dense), ×3 with the backward;
minimum bytes = each operand read once and each result written once. The bound is
max(FLOPs / peak FLOP/s, bytes / peak bandwidth) with the device's datasheet peaks
(on CPU, measured ones); "% roofline" is bound / measured median.
On GPU the run ends by proposing `_dispatch.MEASURED` entries (shape classes where
the fused path beat XLA forward and forward+backward in every measured shape), then
re-times auto with them to confirm it is never slower than XLA.
"""

import argparse
import itertools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from kernels import _dispatch, _forward

from ._results import markdown_table, median_time, write_section

# device-kind substring -> (bf16 dense FLOP/s, f32 (TF32) FLOP/s, HBM bytes/s), datasheet.
PEAKS = {
    "H100 PCIe": (756e12, 378e12, 2.0e12),
    "H100": (989e12, 494e12, 3.35e12),
    "H200": (989e12, 494e12, 4.8e12),
    "A100": (312e12, 156e12, 2.0e12),
}
ACTIVATION = "gelu"


def peaks(dtype) -> tuple[float, float, str]:
    """(FLOP/s, bytes/s, source) for the default device and dtype."""
    kind = jax.devices()[0].device_kind
    for name, (bf16, f32, bw) in PEAKS.items():
        if name in kind:
            return (bf16 if dtype == jnp.bfloat16 else f32), bw, f"datasheet {name}"
    x = jnp.ones((1024, 1024), dtype)
    flops = 2 * 1024**3 / _best_time(jax.jit(lambda x: x @ x), x)
    y = jnp.ones((16 * 2**20,), jnp.float32)  # 64 MiB, read once
    bw = y.nbytes / _best_time(jax.jit(jnp.sum), y)
    return flops, bw, "measured: best of 10, matmul 1024^3 and sum of 64 MiB"


def _best_time(fn, *args, repeats=10):
    """Fastest of `repeats` runs: the closest a busy machine gets to its peak."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def roofline(m, k, n, r, itemsize, *, dense, backward, peak_flops, peak_bw) -> float:
    """Lower bound in seconds from FLOPs and the minimum bytes moved."""
    w = k * n if dense else r * (k + n)
    flops = 2 * m * w
    nbytes = m * k + w + n + m * n  # read x, weights, bias; write y
    if backward:
        flops *= 3
        nbytes += 2 * m * k + m * n + 2 * w + 2 * n  # read x, g, weights; write dx, dW, dbias
    return max(flops / peak_flops, itemsize * nbytes / peak_bw)


def _inputs(m, k, n, r, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (m, k), dtype)
    a = (jax.random.normal(ks[1], (k, r)) / np.sqrt(k)).astype(dtype)
    b = (jax.random.normal(ks[2], (r, n)) / np.sqrt(r)).astype(dtype)
    w = (jax.random.normal(ks[3], (k, n)) / np.sqrt(k)).astype(dtype)
    bias = (jax.random.normal(ks[4], (n,)) / 2).astype(dtype)
    g = jax.random.normal(ks[5], (m, n), dtype)
    return x, a, b, w, bias, g


def _with_vjp(f):
    def run(*args):
        *primals, g = args
        y, vjp = jax.vjp(f, *primals)
        return y, vjp(g)

    return jax.jit(run)


def _dense(x, w, bias):
    return jax.nn.gelu(x @ w + bias)


def _factored(impl):
    return lambda x, a, b, bias: kernels.factored_matmul(x, a, b, bias, ACTIVATION, impl)


# ---------------------------------------------------------------- correctness


def _reference(x, a, b, bias, g):
    """Forward and vjp in float64 on the CPU."""
    cpu = jax.devices("cpu")[0]
    with jax.enable_x64(True), jax.default_device(cpu):
        args = [jnp.asarray(np.asarray(v, np.float64)) for v in (x, a, b, bias, g)]
        f = lambda x, a, b, bias: jax.nn.gelu((x @ a) @ b + bias)
        y, vjp = jax.vjp(f, *args[:4])
        return [np.asarray(v) for v in (y, *vjp(args[4]))]


def _rel_err(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


def check(shapes, dtypes) -> tuple[str, bool]:
    """Pallas and XLA vs a float64 reference: forward and every gradient."""
    names = ["y", "dx", "da", "db", "dbias"]
    rows, ok = [], True
    for (m, k, r, n), dtype in itertools.product(shapes, dtypes):
        x, a, b, _, bias, g = _inputs(m, k, n, r, dtype, seed=1)
        want = _reference(x, a, b, bias, g)
        outs = {}
        for impl in ("xla", "pallas"):
            y, grads = _with_vjp(_factored(impl))(x, a, b, bias, g)
            outs[impl] = [y, *grads]
        floor = 2e-2 if dtype == jnp.bfloat16 else 5e-3  # bf16 rounding; TF32 on GPU
        for name, got_x, got_p, w in zip(names, outs["xla"], outs["pallas"], want):
            e_x, e_p = _rel_err(got_x, w), _rel_err(got_p, w)
            good = e_p <= max(2 * e_x, floor)
            ok &= good
            rows.append(
                [
                    f"{m}x{k}x{r}x{n}",
                    jnp.dtype(dtype).name,
                    name,
                    e_x,
                    e_p,
                    "ok" if good else "FAIL",
                ]
            )
    table = markdown_table(
        ["M×K×r×N", "dtype", "output", "XLA rel. err", "Pallas rel. err", ""], rows
    )
    return table, ok


# ---------------------------------------------------------------- timing


def _grid(quick):
    if quick:
        ms, kns, rs = (1, 16, 4096), (1024,), (16, 64)
    else:
        ms, kns, rs = (1, 16, 4096, 16384), (1024, 4096), (16, 64, 256)
    shapes = list(itertools.product(ms, kns, rs))
    # the memory-bound targets (M >= 4096, r <= 64) first, in case the time budget ends the run
    return sorted(shapes, key=lambda s: not (s[0] >= 4096 and s[2] <= 64))


def time_grid(shapes, dtype, *, kernels_too, budget_s, repeats):
    peak_flops, peak_bw, source = peaks(dtype)
    itemsize = jnp.dtype(dtype).itemsize
    start, rows, records = time.perf_counter(), [], []
    paths = ["dense", "xla"] + (["pallas", "auto"] if kernels_too else [])
    auto_is_xla = not _dispatch.auto_may_use_pallas()
    for m, kn, r in shapes:
        if time.perf_counter() - start > budget_s:
            rows.append([f"stopped: time budget of {budget_s} s spent"] + [""] * 9)
            break
        x, a, b, w, bias, g = _inputs(m, kn, kn, r, dtype)
        for backward in (False, True):
            t = {}
            for path in paths:
                if path == "auto" and auto_is_xla:
                    continue
                f = _dense if path == "dense" else _factored(path)
                args = (x, w, bias) if path == "dense" else (x, a, b, bias)
                fn = _with_vjp(f) if backward else jax.jit(f)
                t[path] = median_time(fn, *args, *((g,) if backward else ()), repeats=repeats)
            bound = roofline(
                m,
                kn,
                kn,
                r,
                itemsize,
                dense=False,
                backward=backward,
                peak_flops=peak_flops,
                peak_bw=peak_bw,
            )
            dense_bound = roofline(
                m,
                kn,
                kn,
                r,
                itemsize,
                dense=True,
                backward=backward,
                peak_flops=peak_flops,
                peak_bw=peak_bw,
            )
            fused = t.get("pallas")
            records.append((m, kn, r, backward, t))
            rows.append(
                [
                    m,
                    kn,
                    r,
                    "fwd+bwd" if backward else "fwd",
                    1e6 * t["dense"],
                    1e6 * t["xla"],
                    "-" if fused is None else 1e6 * fused,
                    "-" if fused is None else t["xla"] / fused,
                    "= XLA" if "auto" not in t else t["xla"] / t["auto"],
                    f"{1e6 * bound:.4g} ({100 * bound / t['xla']:.0f}% / "
                    + ("-" if fused is None else f"{100 * bound / fused:.0f}%")
                    + f"; dense {1e6 * dense_bound:.4g})",
                ]
            )
    header = [
        "M",
        "K=N",
        "r",
        "pass",
        "dense µs",
        "XLA µs",
        "fused µs",
        "XLA/fused",
        "XLA/auto",
        "roofline µs (% reached: XLA / fused; dense bound)",
    ]
    note = (
        f"dtype {jnp.dtype(dtype).name}, bias + {ACTIVATION}; peaks {peak_flops / 1e12:.3g} TFLOP/s, "
        f"{peak_bw / 1e9:.4g} GB/s ({source}); medians of {repeats} runs; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the start."
    )
    return note + "\n\n" + markdown_table(header, rows), records


def tile_sweep(dtype, repeats) -> str:
    """Forward medians of the fused kernel over a few tilings, for the memory-bound targets."""
    rows = []
    for m, kn, r in ((4096, 4096, 64), (16384, 4096, 64)):
        x, a, b, _, bias, _ = _inputs(m, kn, kn, r, dtype)
        default = _dispatch.tiles(m, kn, r)
        xla = median_time(jax.jit(_factored("xla")), x, a, b, bias, repeats=repeats)
        for bm, split in itertools.product((32, 64), (1, 2, 4)):
            tiles = default._replace(bm=bm, split=split)
            fn = jax.jit(
                lambda *args, tiles=tiles: _forward.fused_forward(
                    *args, activation=ACTIVATION, tiles=tiles
                )
            )
            t = median_time(fn, x, a, b, bias, repeats=repeats)
            rows.append(
                [m, kn, r, bm, split, "default" if tiles == default else "", 1e6 * t, xla / t]
            )
    return markdown_table(["M", "K=N", "r", "bm", "split", "", "fused fwd µs", "XLA/fused"], rows)


def suggest_table(records, dtype) -> dict:
    """Shape classes where the fused path beat XLA, forward and forward+backward, every time."""
    verdict: dict[tuple, bool] = {}
    for m, kn, r, _, t in records:
        key = (jnp.dtype(dtype).name, *_dispatch.shape_class(m, kn, kn, r))
        verdict[key] = verdict.get(key, True) and t["pallas"] < 0.97 * t["xla"]
    return {key: frozenset({"fwd", "bwd"}) for key, good in verdict.items() if good}


def verify_auto(records, dtype, suggested, repeats) -> str:
    """Re-time auto with the suggested table against XLA in the classes it changes."""
    kind = jax.devices()[0].device_kind
    _dispatch.MEASURED[kind] = suggested
    rows = []
    for m, kn, r, backward, t in records:
        if (jnp.dtype(dtype).name, *_dispatch.shape_class(m, kn, kn, r)) not in suggested:
            continue
        x, a, b, _, bias, g = _inputs(m, kn, kn, r, dtype)
        fn = _with_vjp(_factored("auto")) if backward else jax.jit(_factored("auto"))
        auto = median_time(fn, x, a, b, bias, *((g,) if backward else ()), repeats=repeats)
        rows.append(
            [
                m,
                kn,
                r,
                "fwd+bwd" if backward else "fwd",
                1e6 * t["xla"],
                1e6 * auto,
                t["xla"] / auto,
                "ok" if auto <= 1.03 * t["xla"] else "SLOWER",
            ]
        )
    del _dispatch.MEASURED[kind]
    return markdown_table(["M", "K=N", "r", "pass", "XLA µs", "auto µs", "XLA/auto", ""], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller grid")
    parser.add_argument("--check", action="store_true", help="correctness checks only")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="timing dtype (default: bfloat16 on accelerators, float32 on CPU)",
    )
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for the timing grid")
    args = parser.parse_args()
    platform = _dispatch.platform()
    accelerator = platform in ("gpu", "tpu")
    kind = jax.devices()[0].device_kind

    shapes = [(37, 129, 5, 70), (1, 40, 17, 17)]
    if accelerator:
        shapes += [(300, 1024, 64, 1000), (64, 512, 256, 384), (4096, 1024, 16, 1024)]
    t0 = time.perf_counter()
    check_table, ok = check(shapes, [jnp.float32, jnp.bfloat16])
    print(
        check_table,
        f"\ncorrectness: {'ok' if ok else 'FAIL'} ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    body = f"### Correctness (Pallas {'compiled' if accelerator else 'in interpret mode'} vs float64)\n\n{check_table}\n"
    if not args.check:
        dtype = jnp.dtype(args.dtype or ("bfloat16" if accelerator else "float32"))
        repeats = 20 if accelerator else 5
        table, records = time_grid(
            _grid(args.quick), dtype, kernels_too=accelerator, budget_s=args.budget, repeats=repeats
        )
        print(table, flush=True)
        body += f"\n### Timings{' (quick grid)' if args.quick else ''}\n\n{table}\n"
        if accelerator:
            sweep = tile_sweep(dtype, repeats)
            print(sweep, flush=True)
            body += (
                f"\n### Tile sweep (fused forward; default tiles: `_dispatch.tiles`)\n\n{sweep}\n"
            )
            suggested = suggest_table(records, dtype)
            body += (
                f"\n### Suggested `_dispatch.MEASURED[{kind!r}]`\n\n```python\n{suggested!r}\n```\n"
            )
            print("suggested MEASURED entry:", repr(suggested), flush=True)
            if suggested:
                verify = verify_auto(records, dtype, suggested, repeats)
                print(verify, flush=True)
                body += f"\n### auto with the suggested table vs XLA\n\n{verify}\n"
        else:
            body += "\nPallas paths are not timed on CPU (interpret mode); auto = XLA here.\n"
    write_section(f"kernels-{platform}", f"Fused factored matmul ({kind})", body)
    if not ok:
        raise SystemExit("correctness check failed")


if __name__ == "__main__":
    main()
