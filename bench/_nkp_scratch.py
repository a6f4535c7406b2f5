"""Part A of bench/nkp_models.py: an MLP and a small CNN factorized before any training,
inits random / spectral / NKP, trained on digits over several seeds."""

import statistics
from pathlib import Path

import equinox as eqx
import jax
import matplotlib
import numpy as np

import lowrank
from bench._digits import DigitsCNN, accuracy, load_split, train
from bench._results import markdown_table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

INITS = ("random", "spectral", "nkp")
CNN_ACTIVATIONS = {r"convs\.\d": jax.nn.relu, "fc1": jax.nn.relu, "fc2": None}


def _mlp(key):
    return eqx.nn.MLP(64, 10, 256, 2, key=key)


def _flat(data):
    x, y = data
    return x.reshape(len(x), -1), y


def from_scratch(seeds: int, steps: int):
    train_set, test_set = load_split(0)
    setups = [
        ("MLP 64-256-256-10", _mlp, _flat(train_set), _flat(test_set), (4, 16), None),
        (
            "CNN (width 32)",
            lambda k: DigitsCNN(32, key=k),
            train_set,
            test_set,
            (4, 16),
            CNN_ACTIVATIONS,
        ),
    ]
    rows, curves = [], {}
    for name, build, tr, te, ranks, activations in setups:
        for rank in ranks:
            for init in INITS:
                accs, finals = [], []
                for seed in range(seeds):
                    dense = build(jax.random.key(seed))
                    low = lowrank.factorize(
                        dense,
                        rank=rank,
                        init=init,
                        activations=activations,
                        key=jax.random.key(100 + seed),
                    )
                    low, curve = train(low, tr, steps=steps, lr=3e-3, seed=seed, curve_every=25)
                    accs.append(accuracy(low, te))
                    finals.append(curve[-1])
                    curves.setdefault((name, rank, init), []).append(curve)
                first = statistics.mean(c[0] for c in curves[(name, rank, init)])
                rows.append(
                    [
                        name,
                        rank,
                        init,
                        f"{first:.3f}",
                        f"{statistics.mean(finals):.4f}",
                        f"{statistics.mean(accs):.4f} ± {statistics.pstdev(accs):.4f}",
                    ]
                )
                print(rows[-1], flush=True)
    _plot(curves, steps)
    header = [
        "model",
        "rank",
        "init",
        "train loss at step 0",
        f"train loss at {steps}",
        "test accuracy (mean ± sd)",
    ]
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
