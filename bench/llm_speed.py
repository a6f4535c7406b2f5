"""SmolLM2-135M inference, dense vs factorized: prefill and KV-cache decode, per XLA:CPU option.

    python -m bench.llm_speed [--rounds 3] [--options default,xnnpack,onednn,one_thread]

The block linears (q/k/v/o, gate/up/down of all 30 blocks; the tied embedding head is
not a Linear) are factorized by `lowrank.factorize(init="spectral")` at
`Budget(params=0.8)` and `0.6`: speed does not depend on the init. Each model runs in
two layouts: as loaded (`separate`: seven projections per block) and `Llama.fused()`
(`fused`: q/k/v and gate/up each one `lowrank.SharedInputLinear`, whose stacked first
factors read the input in one matmul); each layout's ratios are against the dense model
in the same layout. Timed, under jit:
- prefill: `model.prefill` of a batch of 8 x 256 tokens into an empty KV cache (vmap),
  keeping the last position's next token and the cache (what `generate_greedy` does);
- decode: batch 1, 128 greedy `decode_step`s with the KV cache from one start token (an
  empty cache of 128 positions), as one `lax.scan` (no Python dispatch between steps).
Dense and factorized models are timed in the same process in alternating rounds; a
round times each model once (after warm-up), and the table shows medians over rounds.
FLOPs are XLA's own count of the compiled program (`cost_analysis`), parameters count
every array of the model. Each XLA option set runs in its own subprocess with its
`XLA_FLAGS` (the library never sets flags itself): set them the same way, e.g.
`XLA_FLAGS=--xla_cpu_use_xnnpack=true python ...`. An option set this jax rejects is
reported as such.
"""

import argparse
import json
import os
import statistics
import sys
import time

from bench._results import markdown_table, write_section
from bench._xla_options import OPTIONS, how_to_set, option_names, run_child

BUDGETS = (0.8, 0.6)
LAYOUTS = ("separate", "fused")
PREFILL = (8, 256)
NEW_TOKENS = 128


def _child(rounds: int, layers: int | None) -> dict:
    """Time dense and factorized prefill/decode in this process; a JSON-able dict."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import lowrank
    from recipes.pretrained import smollm2

    dense, _ = smollm2(layers)
    separate = {"dense": dense}
    for budget in BUDGETS:
        separate[f"params={budget}"] = lowrank.factorize(
            dense, rank=lowrank.Budget(params=budget), init="spectral"
        )
    models = {f"{LAYOUTS[0]}/{n}": m for n, m in separate.items()}
    models |= {f"{LAYOUTS[1]}/{n}": m.fused() for n, m in separate.items()}

    batch, seq = PREFILL
    ids = jax.random.randint(jax.random.key(0), (batch, seq), 0, dense.config.vocab_size, jnp.int32)
    start_token = ids[0, 0]

    def prefill(model, ids):
        def one(s):
            logits, cache = model.prefill(s, model.init_cache(seq))
            return jnp.argmax(logits[-1]), cache

        return jax.vmap(one)(ids)

    def decode(model, token):
        def step(carry, _):
            token, cache = carry
            logits, cache = model.decode_step(token, cache)
            nxt = jnp.argmax(logits).astype(jnp.int32)
            return (nxt, cache), nxt

        return jax.lax.scan(step, (token, model.init_cache(NEW_TOKENS)), None, length=NEW_TOKENS)[1]

    out = {"params": {}, "flops": {}, "compile_s": {}, "times": {}}
    runs = {}
    for name, model in models.items():
        arrays = [a for a in jax.tree.leaves(eqx.filter(model, eqx.is_array))]
        out["params"][name] = int(sum(a.size for a in arrays))
        for bench, fn, arg in (("prefill", prefill, ids), ("decode", decode, start_token)):
            start = time.perf_counter()
            compiled = jax.jit(fn).lower(model, arg).compile()
            out["compile_s"][f"{name}/{bench}"] = time.perf_counter() - start
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            out["flops"][f"{name}/{bench}"] = float(cost.get("flops", float("nan")))
            runs[(name, bench)] = (compiled, model, arg)
    for compiled, model, arg in runs.values():
        jax.block_until_ready(compiled(model, arg))  # warm-up
    times = {f"{n}/{b}": [] for n, b in runs}
    for _ in range(rounds):
        for bench in ("prefill", "decode"):
            for name in models:
                compiled, model, arg = runs[(name, bench)]
                start = time.perf_counter()
                jax.block_until_ready(compiled(model, arg))
                times[f"{name}/{bench}"].append(time.perf_counter() - start)
    out["times"] = times
    out["load"] = os.getloadavg()
    out["jax"] = jax.__version__
    out["platform"] = jax.default_backend()
    return out


def _run_option(name: str, rounds: int, layers: int | None) -> dict:
    layer_args = [] if layers is None else ["--layers", str(layers)]
    argv = ["-m", "bench.llm_speed", "--child", "--rounds", str(rounds), *layer_args]
    return run_child(OPTIONS[name], argv)


def _rows(name: str, res: dict) -> list[list]:
    med = {k: statistics.median(v) for k, v in res["times"].items()}
    rows = []
    for layout in LAYOUTS:
        base = f"{layout}/dense"
        for model in ["dense", *[f"params={b}" for b in BUDGETS]]:
            rows.append(_row(name, layout, model, med, res, base))
    return rows


def _row(name, layout, model, med, res, base) -> list:
    """One table row: `model` in `layout`, its ratios against `base` (the dense model in
    the same layout)."""
    batch, seq = PREFILL
    key = f"{layout}/{model}"
    prefill = med[f"{key}/prefill"]
    decode = med[f"{key}/decode"]
    p_ratio = res["params"][key] / res["params"][base]
    f_ratio = res["flops"][f"{key}/prefill"] / res["flops"][f"{base}/prefill"]
    t_pre = prefill / med[f"{base}/prefill"]
    t_dec = decode / med[f"{base}/decode"]
    return [
        name,
        layout,
        model,
        batch * seq / prefill,
        NEW_TOKENS / decode,
        p_ratio,
        f_ratio,
        t_pre,
        t_pre / f_ratio,
        t_dec,
        t_dec / p_ratio,
        "" if model == "dense" else ("yes" if t_pre <= 1.15 * f_ratio else "MISS"),
        "" if model == "dense" else ("yes" if t_dec <= 1.1 * p_ratio else "MISS"),
    ]


HEADER = [
    "XLA options",
    "layout",
    "model",
    "prefill tok/s",
    "decode tok/s",
    "param ratio",
    "prefill FLOP ratio",
    "prefill time ratio",
    "prefill time/FLOP",
    "decode time ratio",
    "decode time/param",
    "prefill <= 1.15 x FLOP",
    "decode <= 1.1 x param",
]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--options", type=option_names, default=",".join(OPTIONS))
    parser.add_argument(
        "--layers", type=int, default=None, help="first N blocks only (a smoke run)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.rounds, args.layers)))
        return
    platform = "cpu"  # the parent never starts a backend (a GPU child needs its memory)

    rows, notes = [], []
    for name in args.options:
        print(
            f"[llm_speed] options {name}: {OPTIONS[name] or '(none)'}", file=sys.stderr, flush=True
        )
        res = _run_option(name, args.rounds, args.layers)
        if "error" in res:
            notes.append(f"- `{name}` ({OPTIONS[name]}): not run, {res['error']}")
        else:
            rows += _rows(name, res)
            platform = res["platform"]
            load = ", ".join(f"{x:.1f}" for x in res["load"])
            notes.append(
                f"- `{name}`: {how_to_set(name)}; load average at the end {load}; "
                f"compile s (dense prefill/decode) {res['compile_s']['separate/dense/prefill']:.0f}/"
                f"{res['compile_s']['separate/dense/decode']:.0f}"
            )
        _report(args, platform, rows, notes)  # after each option set


def _report(args, platform, rows, notes):
    body = (
        f"SmolLM2-135M-Instruct (float32{'' if args.layers is None else f', first {args.layers} blocks only'}), "
        f"block linears factorized with init='spectral' at Budget(params=b), each timed as loaded "
        "('separate' layout) and after `Llama.fused()` ('fused': q/k/v and gate/up one "
        "SharedInputLinear each; ratios against the dense model in the same layout). Prefill: batch "
        f"{PREFILL[0]} x "
        f"{PREFILL[1]} tokens. Decode: batch 1, {NEW_TOKENS} greedy steps with the KV cache from one start "
        f"token, as one lax.scan. Median of {args.rounds} alternating rounds; param ratio over all arrays "
        "(the tied embedding included), FLOP ratio from XLA's cost analysis of the compiled prefill. "
        "Targets: decode time ratio <= 1.1 x param ratio, prefill time ratio <= 1.15 x FLOP ratio.\n\n"
        + markdown_table(HEADER, rows)
        + "\n\n"
        + "\n".join(notes)
    )
    print(body, file=sys.stderr, flush=True)
    if not args.no_write:
        section = "llm_speed" if platform == "cpu" else f"llm_speed-{platform}"
        write_section(
            section,
            f"SmolLM2-135M inference ({platform}): dense vs factorized (bench/llm_speed.py)",
            body,
        )


if __name__ == "__main__":
    main()
