"""A standalone example: a small CNN on scikit-learn's digits, factorized, fine-tuned, reported.

Plain `lowrank` calls without the recipe machinery (`make demo` runs the digits_demo
recipe instead: `python -m recipes.run digits_demo`). Everything is offline (the 1,797
real 8x8 digits ship with scikit-learn) and runs in a couple of minutes on two CPU cores:

    python -m recipes.demo [--budget 0.3] [--steps 400] [--finetune-steps 150]
"""

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import lowrank

from ._report import seconds_in_turns


class DigitsCNN(eqx.Module):
    """Three 3x3 convs and a two-layer head, for 1x8x8 images: `model(x) -> logits`
    on one (1, 8, 8) image.

    Args:
        width: channels of the first conv (the other two have twice as many).
        key: initializes the layers.
    """

    convs: list
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, width: int = 64, *, key):
        k = jax.random.split(key, 5)
        self.convs = [
            eqx.nn.Conv2d(1, width, 3, padding=1, key=k[0]),
            eqx.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, key=k[1]),
            eqx.nn.Conv2d(2 * width, 2 * width, 3, padding=1, key=k[2]),
        ]
        self.fc1 = eqx.nn.Linear(2 * width * 16, 256, key=k[3])
        self.fc2 = eqx.nn.Linear(256, 10, key=k[4])

    def __call__(self, x):
        """Args:
            x: one (1, 8, 8) image.

        Returns:
            The (10,) logits.
        """
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        return self.fc2(jax.nn.relu(self.fc1(x.reshape(-1))))


def load_split(seed: int = 0):
    """Digits scaled to [0, 1] as (N, 1, 8, 8), split 80/20 with a fixed permutation.

    Args:
        seed: seed of the permutation.

    Returns:
        ((train images, train labels), (test images, test labels)).
    """
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def _loss(model, x, y):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train(model, data, *, steps: int, lr: float, seed: int, batch: int = 128):
    """Adam with cosine decay on random minibatches (drawn with replacement).

    Args:
        model: the model to train (not changed).
        data: (images, labels).
        steps: optimizer steps.
        lr: initial learning rate, decayed to 0 over `steps`.
        seed: seed of the minibatch draws.
        batch: examples per step.

    Returns:
        The trained model.
    """
    x, y = data
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, xb, yb):
        loss, grads = eqx.filter_value_and_grad(_loss)(model, xb, yb)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(y), batch)
        model, opt_state, loss = step(model, opt_state, x[idx], y[idx])
    return model


@eqx.filter_jit
def predict(model, x):
    """Top-1 classes of a batch of images (jitted).

    Args:
        model: a `DigitsCNN` (dense or factorized).
        x: (N, 1, 8, 8) images.

    Returns:
        (N,) predicted classes.
    """
    return jnp.argmax(jax.vmap(model)(x), axis=-1)


def accuracy(model, data) -> float:
    """Top-1 accuracy.

    Args:
        model: a `DigitsCNN`.
        data: (images, labels).

    Returns:
        The share of correctly classified images.
    """
    x, y = data
    return float(np.mean(np.asarray(predict(model, x)) == y))


def median_inference_seconds(model, x, repeats: int = 30) -> float:
    """Median wall time of `predict(model, x)` over `repeats` calls, after compiling.

    Args:
        model: a `DigitsCNN`.
        x: the images.
        repeats: timed calls.

    Returns:
        Seconds per call.
    """
    return seconds_in_turns(predict, [model], x, rounds=1, repeats=repeats)[0]


def main(argv=None):
    """The command line: train the dense CNN, factorize it under a parameter budget,
    fine-tune it, and print the plan, parameters, accuracies and inference times.

    Args:
        argv: the arguments (default sys.argv[1:]): --budget, --steps,
            --finetune-steps, --init, --seed.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.3, help="fraction of parameters to keep")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--init", default="spectral")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train_set, test_set = load_split(args.seed)
    print(f"digits: {len(train_set[1])} train / {len(test_set[1])} test images, 8x8, 10 classes")
    dense = DigitsCNN(key=jax.random.key(args.seed))
    t0 = time.perf_counter()
    dense = train(dense, train_set, steps=args.steps, lr=3e-3, seed=args.seed)
    dense_acc = accuracy(dense, test_set)
    print(
        f"trained dense CNN for {args.steps} steps ({time.perf_counter() - t0:.0f}s): "
        f"test accuracy {dense_acc:.4f}"
    )

    example = jnp.zeros((1, 8, 8))
    low, plan = lowrank.factorize(
        dense,
        rank=lowrank.Budget(params=args.budget),
        init=args.init,
        example=example,
        return_plan=True,
    )
    print()
    print(plan)
    print()
    low_acc = accuracy(low, test_set)
    tuned = train(low, train_set, steps=args.finetune_steps, lr=3e-4, seed=args.seed + 1)
    tuned_acc = accuracy(tuned, test_set)

    dense_sum, low_sum = (
        lowrank.summary(dense, example=example),
        lowrank.summary(tuned, example=example),
    )
    flop_ratio = low_sum.flops / dense_sum.flops
    param_ratio = low_sum.total_params / dense_sum.total_params
    x_test = jnp.asarray(test_set[0])
    t_dense = median_inference_seconds(dense, x_test)
    t_low = median_inference_seconds(tuned, x_test)
    print(
        f"parameters: {dense_sum.total_params:,} -> {low_sum.total_params:,} (x{param_ratio:.3f})"
    )
    print(
        f"accuracy: dense {dense_acc:.4f} | factorized, before fine-tune {low_acc:.4f} | "
        f"after {args.finetune_steps} fine-tune steps {tuned_acc:.4f}"
    )
    print(
        f"inference on {len(x_test)} images (median of 30): dense {t_dense * 1e3:.2f} ms, "
        f"factorized {t_low * 1e3:.2f} ms -> time ratio {t_low / t_dense:.3f} "
        f"vs FLOP ratio {flop_ratio:.3f}"
    )


if __name__ == "__main__":
    main()
