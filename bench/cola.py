"""CoLA layers vs plain low rank vs dense: byte-level Shakespeare LMs trained from scratch.

Four small decoder-only transformers (`recipes.models.Transformer`), each trained from
scratch for the same steps on the same batches by the one training loop
(`recipes.train.train`), on the train works of Shakespeare (`recipes.text`):

- dense: every attention projection and MLP layer an `eqx.nn.Linear`;
- low rank: those layers (`recipes.student.FACTORIZE_TARGET`) as `lowrank.LowRankLinear`
  u·(v·x) at one rank r, random factors (`init="random"`);
- CoLA: the same layers at the same rank as u·σ(v·x) (`inner_activation`, CoLA,
  arXiv:2502.10940): the FLOPs of low rank (σ costs no multiply-add);
- dense narrow: a dense model of the same depth whose width matches low rank's
  non-embedding parameters (`recipes.student.dense_student`), so about its FLOPs.

r defaults to the rank that halves those layers' FLOPs. Reported per variant, mean ±
std over the seeds (the seed sets the initialization and the batches, the same for
every variant): non-embedding parameters, FLOPs per token (multiply + add: the linear
layers, the attention scores and their weighted sum over the full T x T matrix that
the model computes before masking, and the tied head), train and validation bits per
byte after the last step (fixed training windows; unseen works), and wall time per
step (compile left out).

    python -m bench.cola [--seeds 3] [--steps 200] [--quick] [--no-write]

Writes its table into bench/RESULTS.md (section "cola"; `--results PATH` elsewhere).
"""

import argparse
import math
import statistics
import time

import jax
import jax.random as jr
import numpy as np

import lowrank
from bench._results import markdown_table, write_section
from recipes import student as st
from recipes.config import OptimConfig, TrainConfig
from recipes.models import Transformer
from recipes.text import eval_windows, load_corpus
from recipes.train import make_optimizer, train

VARIANTS = ("dense", "low rank", "CoLA", "dense narrow")
BITS = 1 / math.log(2)


def layer_flops_ratio(model: Transformer, rank: int) -> float:
    """Multiply-adds of the factorized layers at `rank`, r·Σ(m + n), over dense Σ m·n."""
    shapes = [e.shape for e in lowrank.select(model, target=st.FACTORIZE_TARGET).entries]
    return rank * sum(m + n for m, n in shapes) / sum(m * n for m, n in shapes)


def half_flops_rank(model: Transformer) -> int:
    """The one rank r at which the factorized layers cost half their dense FLOPs."""
    return round(0.5 / layer_flops_ratio(model, 1))


def with_inner_activation(model, activation: str):
    """`model` with every `LowRankLinear` computing u·σ(v·x), σ = `activation`."""

    def swap(layer):
        if not isinstance(layer, lowrank.LowRankLinear):
            return layer
        return lowrank.LowRankLinear(
            layer.u, layer.v, layer.bias, impl=layer.impl, inner_activation=activation
        )

    is_lowrank = lambda x: isinstance(x, lowrank.LowRankLinear)
    return jax.tree_util.tree_map(swap, model, is_leaf=is_lowrank)


def build(variant: str, shape: dict, rank: int, activation: str, seed: int) -> Transformer:
    """The untrained model of `variant`; the same dense init under every variant."""
    k_model, k_factors = jr.split(jr.key(seed))
    dense = Transformer(**shape, key=k_model)
    if variant == "dense":
        return dense
    factored = lowrank.factorize(
        dense, rank=rank, target=st.FACTORIZE_TARGET, init="random", key=k_factors
    )
    if variant == "low rank":
        return factored
    if variant == "CoLA":
        return with_inner_activation(factored, activation)
    params = st.non_embedding_params(factored) / st.non_embedding_params(dense)
    return st.dense_student(dense, params=params, key=k_model)


def flops_per_token(model: Transformer, length: int) -> int:
    """Multiply + add per token of a window of `length`: the linear layers (run once
    per token), per block the scores q·k and their weighted sum of v over all `length`
    positions (2 · 2 · length · d_model), and the tied head (2 · d_model · vocab)."""
    linear = lowrank.summary(model).flops
    attention = model.n_layers * 4 * length * model.d_model
    head = 2 * model.d_model * model.vocab_size if model.tie_embeddings else 0
    return linear + attention + head


def run_one(model, corpus, args, seed: int, val, train_windows) -> dict[str, float]:
    """Train `model` for `args.steps` steps; its scores and mean seconds per step."""
    optim = OptimConfig(
        name="adamw",
        lr=args.lr,
        weight_decay=0.01,
        warmup_steps=min(50, args.steps // 10),
        grad_clip=1.0,
    )
    optimizer, schedule = make_optimizer(optim, args.steps)
    config = TrainConfig(
        steps=args.steps, log_every=max(1, args.steps // 10), seed=seed, progress=False
    )
    batches = st.train_batches(corpus.train, batch_size=args.batch, length=args.length, seed=seed)
    result = train(
        model,
        None,
        loss_fn=st.lm_loss,
        optimizer=optimizer,
        schedule=schedule,
        train_data=batches,
        config=config,
    )
    return {
        "train": BITS * st.validation_loss(result.model, train_windows),
        "val": BITS * st.validation_loss(result.model, val),
        "step_s": st.step_seconds(result.history, args.batch),
    }


def mean_std(values: list[float], digits: int) -> str:
    """ "mean ± std" (the sample std; only the mean for one value)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(results: dict[str, dict], dense_flops: int) -> str:
    """The markdown table: one row per variant, scores as mean ± std over the seeds."""
    header = [
        "variant",
        "rank",
        "d_model",
        "non-emb. params",
        "FLOPs/token",
        "vs dense",
        "train bits/byte",
        "val bits/byte",
        "ms/step",
    ]
    rows = []
    for name, r in results.items():
        runs = r["runs"]
        rows.append(
            [
                name,
                r["rank"],
                r["d_model"],
                f"{r['params']:,}",
                f"{r['flops']:,}",
                f"{r['flops'] / dense_flops:.3f}",
                mean_std([x["train"] for x in runs], 3),
                mean_std([x["val"] for x in runs], 3),
                mean_std([1e3 * x["step_s"] for x in runs], 0),
            ]
        )
    return markdown_table(header, rows)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=None, help="default: half the FLOPs")
    parser.add_argument("--activation", default="silu", choices=("silu", "gelu", "relu"))
    parser.add_argument("--eval-windows", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="a tiny end-to-end check")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--results", default=None, help="write here instead of RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.d_model, args.n_layers = 1, 4, 32, 1
        args.n_heads, args.length, args.batch, args.eval_windows = 2, 16, 4, 8
    return args


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Train every variant for every seed, print the table and write it.

    Args:
        argv: the command line (default sys.argv[1:]).

    Returns:
        {variant: its rank, d_model, params, FLOPs per token and per-seed "runs"}.
    """
    args = parse(argv)
    start = time.perf_counter()
    corpus = load_corpus(val_fraction=0.1, seed=0)
    val = eval_windows(corpus.validation, args.length, max_windows=args.eval_windows)
    rng = np.random.default_rng(0)
    train_windows = st.random_windows(corpus.train, rng, args.eval_windows, args.length)
    shape = dict(
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        context=args.length,
    )
    skeleton = Transformer(**shape, key=jr.key(0))
    rank = args.rank or half_flops_rank(skeleton)
    results = {}
    for seed in range(args.seeds):
        for variant in VARIANTS:
            model = build(variant, shape, rank, args.activation, seed)
            entry = results.setdefault(
                variant,
                {
                    "rank": rank if variant in ("low rank", "CoLA") else "dense",
                    "d_model": model.d_model,
                    "params": st.non_embedding_params(model),
                    "flops": flops_per_token(model, args.length),
                    "runs": [],
                },
            )
            scores = run_one(model, corpus, args, seed, val, train_windows)
            entry["runs"].append(scores)
            print(f"seed {seed} {variant}: {scores}", flush=True)
    body = "\n".join(
        [
            f"{args.n_layers} blocks, width {args.d_model}, {args.n_heads} heads, "
            f"{args.steps} steps of {args.batch} windows of {args.length} bytes "
            f"(AdamW lr {args.lr}, warm-up + cosine), {args.seeds} seed(s), mean ± std; "
            f"CoLA σ = {args.activation}. Bits/byte after the last step: train on "
            f"{len(train_windows)} fixed training windows, val on {len(val)} windows of "
            f"unseen works. FLOPs/token: multiply + add of every matmul; at rank {rank} "
            f"the factorized layers (attention projections, MLP) cost "
            f"{layer_flops_ratio(skeleton, rank):.3f} of their dense FLOPs.",
            "",
            table(results, results["dense"]["flops"]),
            "",
            f"Total wall time {time.perf_counter() - start:.0f} s.",
        ]
    )
    print(body)
    if not args.no_write:
        where = {} if args.results is None else {"path": args.results}
        write_section("cola", "CoLA vs low rank vs dense, from scratch (issue 15)", body, **where)
    return results


if __name__ == "__main__":
    main()
