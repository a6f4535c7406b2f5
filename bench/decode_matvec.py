"""Why compressed decode is not faster on CPU: batch-1 matvecs, dense vs factored, by cores.

    python -m bench.decode_matvec [--rounds 5]

A decode step without the model around it: 30 blocks of SmolLM2-135M's seven
projections (q/k/v/o 576 -> 576/192/192/576, gate/up 576 -> 1536, down 1536 -> 576), each
a dense matvec W @ x or a factored one u @ (v @ x) at rank r = int(ratio · m·n / (m + n))
(the peers' uniform ranks, so the factors hold `ratio` of the parameters), with a
residual, SiLU gate and normalization between them; 128 steps as one jitted `lax.scan`.
A third chain per ratio stores each layer's factors as two halves of the rank (u₁ v₁ x +
u₂ v₂ x, the rank rounded down to even): two independent matvec pairs that XLA:CPU
could run on two cores at once.
Random float32 weights (the speed does not depend on their values). Each core count runs
in a subprocess of its own, pinned with `os.sched_setaffinity` before JAX starts (what
`taskset -c 0` does), the models timed in alternating rounds there; medians over rounds,
ratios against the dense chain of the same process.
"""

import argparse
import functools
import json
import operator
import os
import statistics
import subprocess
import sys
import time

from bench._results import markdown_table, write_section

SHAPES = ((576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536))
BLOCKS = 30
STEPS = 128
RATIOS = (0.8, 0.6)


def rank(ratio: float, m: int, n: int, halves: int = 1) -> int:
    """The uniform rank that keeps `ratio` of an m x n layer, a multiple of `halves`."""
    r = int(ratio * m * n / (m + n))
    return r - r % halves


def _child(rounds: int) -> dict:
    """Time the dense and factored chains in this process; a JSON-able dict."""
    import jax
    import jax.numpy as jnp

    key = jax.random.key(0)

    def weights(ratio, halves=1):
        """Dense matrices (ratio None), or per layer a tuple of `halves` (u, v) pairs."""
        blocks = []
        for i in range(BLOCKS):
            layer = []
            for j, (m, n) in enumerate(SHAPES):
                k = jax.random.fold_in(key, i * len(SHAPES) + j)
                if ratio is None:
                    layer.append(jax.random.normal(k, (m, n)) * 0.02)
                else:
                    r = rank(ratio, m, n, halves)
                    u = jax.random.normal(k, (m, r)) * 0.02
                    v = jax.random.normal(jax.random.fold_in(k, 1), (r, n)) * 0.02
                    pairs = zip(jnp.split(u, halves, axis=1), jnp.split(v, halves, axis=0))
                    layer.append(tuple(pairs))
            blocks.append(layer)
        return blocks

    def linear(w, x):
        if isinstance(w, tuple):
            return functools.reduce(operator.add, (u @ (v @ x) for u, v in w))
        return w @ x

    def step(blocks, x):
        for q, k, v, o, gate, up, down in blocks:
            keys_values = jnp.sum(linear(k, x)) + jnp.sum(linear(v, x))
            x = x + linear(o, linear(q, x)) + 0.0 * keys_values
            x = x + linear(down, jax.nn.silu(linear(gate, x)) * linear(up, x))
            x = x / jnp.sqrt(jnp.mean(x * x) + 1e-6)
        return x

    @jax.jit
    def decode(blocks, x):
        return jax.lax.scan(lambda c, _: (step(blocks, c), None), x, None, length=STEPS)[0]

    models = {"dense": weights(None)}
    for r in RATIOS:
        models |= {f"params={r}": weights(r), f"params={r}, 2 halves": weights(r, 2)}
    x = jnp.ones(SHAPES[0][1])
    for blocks in models.values():
        decode(blocks, x).block_until_ready()
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, blocks in models.items():
            start = time.perf_counter()
            decode(blocks, x).block_until_ready()
            times[name].append(time.perf_counter() - start)
    params = {n: sum(a.size for a in jax.tree.leaves(b)) for n, b in models.items()}
    return {
        n: {"ms_per_step": statistics.median(t) / STEPS * 1e3, "params": params[n]}
        for n, t in times.items()
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child-cores", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_cores:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.child_cores]))
        print(json.dumps(_child(args.rounds)))
        return
    available = len(os.sched_getaffinity(0))
    rows = []
    for cores in sorted({1, available}):
        cmd = [sys.executable, "-m", "bench.decode_matvec", "--rounds", str(args.rounds)]
        out = subprocess.run([*cmd, "--child-cores", str(cores)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        res = json.loads(out.stdout.strip().splitlines()[-1])
        base = res["dense"]
        for name, r in res.items():
            time_ratio = r["ms_per_step"] / base["ms_per_step"]
            param_ratio = r["params"] / base["params"]
            rows.append(
                [cores, name, r["ms_per_step"], param_ratio, time_ratio, time_ratio / param_ratio]
            )
            print(rows[-1], flush=True)
    header = ["cores", "chain", "ms / step", "param ratio", "time ratio", "time / param"]
    body = (
        f"{BLOCKS} blocks x 7 SmolLM2 projections as batch-1 matvecs, {STEPS} steps in one "
        f"`lax.scan`, dense W @ x against factored u @ (v @ x) at uniform ranks ('2 halves': "
        f"u1 @ (v1 @ x) + u2 @ (v2 @ x), the rank split in two); medians of "
        f"{args.rounds} alternating rounds, each core count in its own pinned process.\n\n"
        + markdown_table(header, rows)
    )
    write_section(
        "decode_matvec", "Batch-1 matvecs, dense vs factored (bench/decode_matvec.py)", body
    )


if __name__ == "__main__":
    main()
