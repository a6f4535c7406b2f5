"""NKP on whole models: training from scratch, and compressing trained models, on real data.

    python -m bench.nkp_models [--part all|scratch|compress] [--seeds 3] [--steps 300]
                               [--lm-steps 400] [--skip-transformer]

A. From scratch (scikit-learn digits): an MLP and a small CNN, factorized at two
   ranks before any training, inits random / spectral / NKP (the dense random init is
   the target), trained for the same steps over several seeds: test accuracy (mean and
   spread) and the training-loss curve.
B. Compression (no fine-tuning): the trained digits CNN (several seeds), and a small
   byte-level transformer trained on Shakespeare, factorized at parameter ratios 0.5,
   0.25 and 0.1 with the peers (spectral; whitened on dense inputs, as SVD-LLM) and
   the calibrated inits with and without sequential calibration: accuracy, loss and
   KL to the dense model right after, and whether NKP beats the best peer.
Tables go into bench/RESULTS.md; curves into bench/nkp_training.png.
"""

import argparse
import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank
from bench._digits import DigitsCNN, load_split, train
from bench._results import markdown_table, write_section

from ._nkp_scratch import CNN_ACTIVATIONS, from_scratch

LM_ACTIVATIONS = {r".*attn\..*": None, r".*\.fc1": jax.nn.gelu, r".*\.fc2": None}


# label, init, calibrated, sequential. The peers as published: spectral (Khodak et al.) and
# whitened on the dense model's inputs (SVD-LLM); then each calibrated init both ways.
COMPRESSORS = [
    ("spectral", "spectral", False, False),
    ("whitened (SVD-LLM: dense inputs)", "whitened", True, False),
    ("whitened, sequential", "whitened", True, True),
    ("nkp + calibration, dense inputs", "nkp", True, False),
    ("nkp + calibration, sequential (default)", "nkp", True, True),
]
PEERS = ("spectral", "whitened (SVD-LLM: dense inputs)")
OURS = "nkp + calibration, sequential (default)"
RATIOS = (0.5, 0.25, 0.1)


def _compress(dense, ratio, calibration, activations, evaluate, **options):
    """{label: (metrics..., seconds)} for every compressor at one parameter ratio."""
    out = {}
    for label, init, calibrated, sequential in COMPRESSORS:
        start = time.perf_counter()
        low = lowrank.factorize(
            dense,
            rank=lowrank.Budget(params=ratio),
            init=init,
            activations=activations,
            calibration=calibration if calibrated else None,
            sequential=sequential,
            **options,
        )
        seconds = time.perf_counter() - start
        out[label] = (*evaluate(low), seconds)
        print(ratio, label, out[label], flush=True)
    return out


def _kl(dense_logits, low_logits):
    """Mean KL(dense ‖ factorized) of the predictive distributions, nats per prediction."""
    p = jax.nn.log_softmax(dense_logits, axis=-1)
    q = jax.nn.log_softmax(low_logits, axis=-1)
    return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), axis=-1)))


def compress_cnn(steps: int, seeds: int):
    """The digits CNN, trained from `seeds` seeds: per ratio and compressor the test
    accuracy, test loss and KL to the dense model, means over seeds."""
    train_set, test_set = load_split(0)
    x_te, y_te = jnp.asarray(test_set[0]), test_set[1]
    logits_of = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))
    results, dense_rows = {}, []
    for seed in range(seeds):
        dense, _ = train(
            DigitsCNN(key=jax.random.key(seed)), train_set, steps=steps, lr=3e-3, seed=seed
        )
        dense_logits = logits_of(dense, x_te)

        def evaluate(m):
            logits = logits_of(m, x_te)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_te).mean()
            acc = np.mean(np.asarray(jnp.argmax(logits, -1)) == y_te)
            return float(acc), float(loss), _kl(dense_logits, logits)

        dense_rows.append(evaluate(dense)[:2])
        calibration = jnp.asarray(train_set[0][512 * seed : 512 * (seed + 1)])
        for ratio in RATIOS:
            for label, value in _compress(
                dense, ratio, calibration, CNN_ACTIVATIONS, evaluate
            ).items():
                results.setdefault((ratio, label), []).append(value)
    dense_acc, dense_loss = np.mean(dense_rows, axis=0)
    rows = [["digits CNN", "1.0 (dense)", "-", f"{dense_acc:.4f}", f"{dense_loss:.4f}", "0", "-"]]
    for (ratio, label), values in results.items():
        acc, loss, kl, seconds = np.mean(values, axis=0)
        rows.append(
            ["digits CNN", ratio, label, f"{acc:.4f}", f"{loss:.4f}", f"{kl:.3g}", f"{seconds:.1f}"]
        )
    return rows, {k: np.mean(v, axis=0)[1:3] for k, v in results.items()}, dense_loss


def compress_transformer(steps: int):
    """A 2-block byte transformer on Shakespeare: bits per byte and KL to the dense model
    on unseen plays, per ratio and compressor."""
    from bench.distill_smoke import bits_per_byte
    from bench.distill_smoke import train as train_lm
    from recipes.models import Transformer
    from recipes.text import eval_windows, load_corpus, sample_windows

    corpus = load_corpus()
    length = 64
    dense = Transformer(d_model=128, n_layers=2, n_heads=4, context=length, key=jax.random.key(0))
    dense = train_lm(
        dense, corpus.train, steps=steps, key=jax.random.key(1), batch=32, length=length, lr=3e-3
    )
    valid = eval_windows(corpus.validation, length, max_windows=512)
    logits_of = eqx.filter_jit(lambda m, w: jax.vmap(m)(w[:, :-1]))
    dense_logits = [
        logits_of(dense, jnp.asarray(valid[i : i + 64])) for i in range(0, len(valid), 64)
    ]

    def evaluate(m):
        kl = np.mean(
            [
                _kl(d, logits_of(m, jnp.asarray(valid[i * 64 : (i + 1) * 64])))
                for i, d in enumerate(dense_logits)
            ]
        )
        return bits_per_byte(m, valid), float(kl) / math.log(2)

    dense_bpb = bits_per_byte(dense, valid)
    rows = [["byte transformer (2x128)", "1.0 (dense)", "-", "-", f"{dense_bpb:.4f} bpb", "0", "-"]]
    calibration = sample_windows(
        jnp.asarray(corpus.train), key=jax.random.key(2), batch_size=32, length=length
    )[:, :-1]
    summary = {}
    for ratio in RATIOS:
        results = _compress(
            dense, ratio, calibration, LM_ACTIVATIONS, evaluate, target=r"blocks\..*"
        )
        for label, (bpb, kl, seconds) in results.items():
            rows.append(
                [
                    "byte transformer (2x128)",
                    ratio,
                    label,
                    "-",
                    f"{bpb:.4f} bpb",
                    f"{kl:.3g}",
                    f"{seconds:.1f}",
                ]
            )
            summary[(ratio, label)] = (bpb, kl)
    return rows, summary, dense_bpb


def verdicts(model: str, summary: dict, dense_loss: float) -> list[str]:
    """One line per ratio: does ours lose less than the best peer (test loss and KL)?"""
    lines = []
    for ratio in RATIOS:
        ours = summary[(ratio, OURS)]
        peer_loss, peer_name = min((summary[(ratio, p)][0], p) for p in PEERS)
        peer_kl = min(summary[(ratio, p)][1] for p in PEERS)
        lines.append(
            f"- {model}, {ratio:g} of the parameters: loss increase over dense {ours[0] - dense_loss:+.4f} "
            f"(best peer, {peer_name}: {peer_loss - dense_loss:+.4f}); KL to dense {ours[1]:.3g} "
            f"(best peer {peer_kl:.3g}): "
            + (
                "loses less than the best peer"
                if ours[0] < peer_loss and ours[1] < peer_kl
                else "does NOT beat the best peer on both"
            )
        )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lm-steps", type=int, default=400)
    parser.add_argument("--part", choices=("all", "scratch", "compress"), default="all")
    parser.add_argument("--skip-transformer", action="store_true")
    args = parser.parse_args()

    if args.part in ("all", "scratch"):
        scratch = from_scratch(args.seeds, args.steps)
        print(scratch)
        write_section(
            "nkp_models",
            "NKP on whole models: training from scratch (bench/nkp_models.py)",
            (
                f"Digits, {args.seeds} seeds, {args.steps} Adam steps, same for every init. Each model is "
                "factorized before training at the given rank (every Linear/Conv), with the dense random "
                f"init as the target of spectral/NKP. Curves: bench/nkp_training.png.\n\n{scratch}"
            ),
        )
    if args.part in ("all", "compress"):
        rows, summary, dense_loss = compress_cnn(400, args.seeds)
        lines = verdicts("digits CNN", summary, dense_loss)
        if not args.skip_transformer:
            lm_rows, lm_summary, dense_bpb = compress_transformer(args.lm_steps)
            rows += lm_rows
            lines += verdicts("byte transformer", lm_summary, dense_bpb)
        header = [
            "model",
            "params kept",
            "init",
            "test accuracy",
            "test loss",
            "KL to dense",
            "factorize s",
        ]
        table = markdown_table(header, rows)
        print(table, "\n".join(lines), sep="\n")
        write_section(
            "nkp_compression",
            "NKP compressing trained models, no fine-tuning (bench/nkp_models.py)",
            (
                f"Budget(params=ratio) over the factorized layers (the digits CNN: its 3 convs and 2 "
                f"Linears; the transformer: the blocks' attention and MLP projections, embeddings stay "
                f"dense). The digits CNN is trained {args.seeds} times (seeds 0..{args.seeds - 1}, 400 Adam "
                f"steps), each with its own 512 training images as calibration; its rows are means over the "
                f"seeds. The transformer (one seed, {args.lm_steps} steps) calibrates on 32 training "
                "windows of 64 bytes and is scored on 512 windows of unseen plays. KL to dense: mean "
                "KL(dense ‖ factorized) of the predicted distributions (nats per image; bits per byte "
                "for the transformer). Sequential: layers fitted in run order on the inputs the partly "
                "factorized model gives them (lowrank's default with calibration); dense inputs: every "
                f"layer fitted on the dense model's inputs, as SVD-LLM does.\n\n{table}\n\n"
                + "\n".join(lines)
            ),
        )


if __name__ == "__main__":
    main()
