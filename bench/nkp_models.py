"""NKP on whole models: training from scratch, and compressing trained models, on real data.

    python -m bench.nkp_models [--seeds 3] [--steps 300] [--skip-transformer]

A. From scratch (scikit-learn digits): an MLP and a small CNN, factorized at two
   ranks before any training, inits random / spectral / NKP (the dense random init is
   the target), trained for the same steps over several seeds: test accuracy (mean and
   spread) and the training-loss curve.
B. Compression (no fine-tuning): the trained digits CNN, and a small byte-level
   transformer trained on Shakespeare, factorized at parameter ratios 0.25 and 0.5
   with spectral, whitened and NKP-with-calibration: accuracy / loss right after.
Tables go into bench/RESULTS.md; curves into bench/nkp_training.png.
"""

import argparse
import math
import statistics
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import lowrank
from bench._results import markdown_table, write_section
from recipes.demo import DigitsCNN, accuracy, load_split, train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

INITS = ("random", "spectral", "nkp")
CNN_ACTIVATIONS = {r"convs\.\d": jax.nn.relu, "fc1": jax.nn.relu, "fc2": None}
LM_ACTIVATIONS = {r".*attn\..*": None, r".*\.fc1": jax.nn.gelu, r".*\.fc2": None}


def _mlp(key):
    return eqx.nn.MLP(64, 10, 256, 2, key=key)


def _flat(data):
    x, y = data
    return x.reshape(len(x), -1), y


def _loss_curve(model, data, *, steps, lr, seed, every=25, batch=128):
    """Train like recipes.demo.train but record the full-train-set loss every `every` steps."""
    x, y = data
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

    def loss_fn(m, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(m)(xb), yb).mean()

    @eqx.filter_jit
    def step(m, opt_state, xb, yb):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(m, xb, yb)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(m, eqx.is_array))
        return eqx.apply_updates(m, updates), opt_state, loss

    full_loss = eqx.filter_jit(loss_fn)
    rng = np.random.default_rng(seed)
    curve = [float(full_loss(model, x, y))]
    for i in range(1, steps + 1):
        idx = rng.integers(0, len(y), batch)
        model, opt_state, _ = step(model, opt_state, x[idx], y[idx])
        if i % every == 0:
            curve.append(float(full_loss(model, x, y)))
    return model, curve


def from_scratch(seeds: int, steps: int):
    train_set, test_set = load_split(0)
    setups = [
        ("MLP 64-256-256-10", _mlp, _flat(train_set), _flat(test_set), (4, 16), None),
        ("CNN (width 32)", lambda k: DigitsCNN(32, key=k), train_set, test_set, (4, 16), CNN_ACTIVATIONS),
    ]
    rows, curves = [], {}
    for name, build, tr, te, ranks, activations in setups:
        for rank in ranks:
            for init in INITS:
                accs, finals = [], []
                for seed in range(seeds):
                    dense = build(jax.random.key(seed))
                    low = lowrank.factorize(
                        dense, rank=rank, init=init, activations=activations, key=jax.random.key(100 + seed)
                    )
                    low, curve = _loss_curve(low, tr, steps=steps, lr=3e-3, seed=seed)
                    accs.append(accuracy(low, te))
                    finals.append(curve[-1])
                    curves.setdefault((name, rank, init), []).append(curve)
                first = statistics.mean(c[0] for c in curves[(name, rank, init)])
                rows.append([name, rank, init, f"{first:.3f}", f"{statistics.mean(finals):.4f}",
                             f"{statistics.mean(accs):.4f} ± {statistics.pstdev(accs):.4f}"])  # fmt: skip
                print(rows[-1], flush=True)
    _plot(curves, steps)
    header = ["model", "rank", "init", "train loss at step 0", f"train loss at {steps}", "test accuracy (mean ± sd)"]
    return markdown_table(header, rows)


def _plot(curves, steps):
    keys = sorted({(name, rank) for name, rank, _ in curves})
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, (name, rank) in zip(axes[0], keys):
        for init in INITS:
            runs = np.asarray(curves[(name, rank, init)])
            xs = np.linspace(0, steps, runs.shape[1])
            ax.plot(xs, runs.mean(0), label=init)
            ax.fill_between(xs, runs.min(0), runs.max(0), alpha=0.2)
        ax.set_title(f"{name}, rank {rank}", fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("train loss")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(Path(__file__).with_name("nkp_training.png"), dpi=90)


def _compress_inits(calibration):
    return [("spectral", "spectral", None), ("whitened", "whitened", calibration),
            ("nkp + calibration", "nkp", calibration)]  # fmt: skip


def compress_cnn(steps: int):
    train_set, test_set = load_split(0)
    dense = train(DigitsCNN(key=jax.random.key(0)), train_set, steps=steps, lr=3e-3, seed=0)
    x_te, y_te = test_set

    def test_loss(m):
        logits = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(m, jnp.asarray(x_te))
        return float(optax.softmax_cross_entropy_with_integer_labels(logits, y_te).mean())

    rows = [["digits CNN", "1.0 (dense)", "-", f"{accuracy(dense, test_set):.4f}", f"{test_loss(dense):.4f}"]]
    calibration = jnp.asarray(train_set[0][:512])
    for ratio in (0.5, 0.25):
        for label, init, cal in _compress_inits(calibration):
            low = lowrank.factorize(
                dense, rank=lowrank.Budget(params=ratio), init=init, calibration=cal, activations=CNN_ACTIVATIONS
            )
            rows.append(["digits CNN", ratio, label, f"{accuracy(low, test_set):.4f}", f"{test_loss(low):.4f}"])
            print(rows[-1], flush=True)
    return rows


def compress_transformer(steps: int):
    from bench.distill_smoke import bits_per_byte
    from bench.distill_smoke import train as train_lm
    from recipes.models import Transformer
    from recipes.text import eval_windows, load_corpus, sample_windows

    corpus = load_corpus()
    length = 64
    dense = Transformer(d_model=128, n_layers=2, n_heads=4, context=length, key=jax.random.key(0))
    dense, _ = train_lm(dense, corpus.train, steps=steps, key=jax.random.key(1), batch=32, length=length, lr=3e-3)
    valid = eval_windows(corpus.validation, length, max_windows=512)
    rows = [["byte transformer (2x128)", "1.0 (dense)", "-", "-", f"{bits_per_byte(dense, valid):.4f} bpb"]]
    calibration = sample_windows(jnp.asarray(corpus.train), key=jax.random.key(2), batch_size=32, length=length)[:, :-1]
    for ratio in (0.5, 0.25):
        for label, init, cal in _compress_inits(calibration):
            low = lowrank.factorize(
                dense, rank=lowrank.Budget(params=ratio), init=init, calibration=cal,
                target=r"blocks\..*", activations=LM_ACTIVATIONS,
            )  # fmt: skip
            rows.append(["byte transformer (2x128)", ratio, label, "-", f"{bits_per_byte(low, valid):.4f} bpb"])
            print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lm-steps", type=int, default=400)
    parser.add_argument("--skip-transformer", action="store_true")
    args = parser.parse_args()

    scratch = from_scratch(args.seeds, args.steps)
    print(scratch)
    rows = compress_cnn(400)
    if not args.skip_transformer:
        rows += compress_transformer(args.lm_steps)
    compression = markdown_table(["model", "params kept", "init", "test accuracy", "test loss"], rows)
    print(compression)
    body = (
        f"### A. Training from scratch (digits, {args.seeds} seeds, {args.steps} Adam steps, same for every init)\n\n"
        "Each model is factorized before training at the given rank (every Linear/Conv), with the dense "
        "random init as the target of spectral/NKP. Curves: bench/nkp_training.png.\n\n"
        f"{scratch}\n\n"
        "### B. Compressing trained models, no fine-tuning\n\n"
        "Budget(params=ratio) over the factorized layers (for the transformer: the blocks' attention "
        "and MLP projections; embeddings stay dense). Calibration: 512 training images / 32 training "
        f"windows of 64 bytes.\n\n{compression}"
    )
    write_section("nkp_models", "NKP on whole models (bench/nkp_models.py)", body)


if __name__ == "__main__":
    main()
