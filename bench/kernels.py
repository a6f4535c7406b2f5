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

from kernels import _dispatch, _forward

from ._kernel_cases import ACTIVATION, dense, factored, inputs, with_vjp
from ._kernel_cases import check as check
from ._results import markdown_table, median_time, wall_times, write_section

# device-kind substring -> (bf16 dense FLOP/s, f32 (TF32) FLOP/s, HBM bytes/s), datasheet.
PEAKS = {
    "H100 PCIe": (756e12, 378e12, 2.0e12),
    "H100": (989e12, 494e12, 3.35e12),
    "H200": (989e12, 494e12, 4.8e12),
    "A100": (312e12, 156e12, 2.0e12),
}


def peaks(dtype) -> tuple[float, float, str]:
    """(FLOP/s, bytes/s, source) for the default device and dtype."""
    kind = jax.devices()[0].device_kind
    for name, (bf16, f32, bw) in PEAKS.items():
        if name in kind:
            return (bf16 if dtype == jnp.bfloat16 else f32), bw, f"datasheet {name}"
    # the fastest of 10 runs: the closest a busy machine gets to its peak
    x = jnp.ones((1024, 1024), dtype)
    flops = 2 * 1024**3 / min(wall_times(jax.jit(lambda x: x @ x), x, repeats=10, warmup=1))
    y = jnp.ones((16 * 2**20,), jnp.float32)  # 64 MiB, read once
    bw = y.nbytes / min(wall_times(jax.jit(jnp.sum), y, repeats=10, warmup=1))
    return flops, bw, "measured: best of 10, matmul 1024^3 and sum of 64 MiB"


def roofline(m, k, n, r, itemsize, *, dense, backward, peak_flops, peak_bw) -> float:
    """Lower bound in seconds from FLOPs and the minimum bytes moved."""
    w = k * n if dense else r * (k + n)
    flops = 2 * m * w
    nbytes = m * k + w + n + m * n  # read x, weights, bias; write y
    if backward:
        flops *= 3
        nbytes += 2 * m * k + m * n + 2 * w + 2 * n  # read x, g, weights; write dx, dW, dbias
    return max(flops / peak_flops, itemsize * nbytes / peak_bw)


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
    peak = {"peak_flops": peak_flops, "peak_bw": peak_bw}
    itemsize = jnp.dtype(dtype).itemsize
    start, rows, records = time.perf_counter(), [], []
    paths = ["dense", "xla"] + (["pallas", "auto"] if kernels_too else [])
    auto_is_xla = not _dispatch.auto_may_use_pallas()
    for m, kn, r in shapes:
        if time.perf_counter() - start > budget_s:
            rows.append([f"stopped: time budget of {budget_s} s spent"] + [""] * 9)
            break
        x, a, b, w, bias, g = inputs(m, kn, kn, r, dtype)
        for backward in (False, True):
            t = {}
            for path in paths:
                if path == "auto" and auto_is_xla:
                    continue
                f = dense if path == "dense" else factored(path)
                args = (x, w, bias) if path == "dense" else (x, a, b, bias)
                fn = with_vjp(f) if backward else jax.jit(f)
                t[path] = median_time(fn, *args, *((g,) if backward else ()), repeats=repeats)
            bound, dense_bound = (
                roofline(m, kn, kn, r, itemsize, dense=d, backward=backward, **peak)
                for d in (False, True)
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
        x, a, b, _, bias, _ = inputs(m, kn, kn, r, dtype)
        default = _dispatch.tiles(m, kn, r)
        xla = median_time(jax.jit(factored("xla")), x, a, b, bias, repeats=repeats)
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
        x, a, b, _, bias, g = inputs(m, kn, kn, r, dtype)
        fn = with_vjp(factored("auto")) if backward else jax.jit(factored("auto"))
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
