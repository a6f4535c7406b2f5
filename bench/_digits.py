"""scikit-learn's 8x8 digits for the NKP bench: a small CNN, an 80/20 split, top-1
accuracy, and Adam with cosine decay through the shared trainer (`recipes.train.train`)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from recipes.config import TrainConfig
from recipes.train import train as train_loop


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
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        return self.fc2(jax.nn.relu(self.fc1(x.reshape(-1))))


def load_split(seed: int = 0):
    """Digits scaled to [0, 1] as (N, 1, 8, 8), split 80/20 with a fixed permutation:
    ((train images, train labels), (test images, test labels))."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


@eqx.filter_jit
def _predict(model, x):
    return jnp.argmax(jax.vmap(model)(x), axis=-1)


def accuracy(model, data) -> float:
    """Top-1 accuracy of `model` on (images, labels)."""
    x, y = data
    return float(np.mean(np.asarray(_predict(model, x)) == y))


def _losses(model, batch):
    logits = jax.vmap(model)(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def _loss_fn(model, state, batch, key):
    return _losses(model, batch).mean(), (state, {})


def train(model, data, *, steps: int, lr: float, seed: int, batch: int = 128, curve_every=0):
    """Adam with cosine decay from `lr` to 0 over `steps`, on minibatches of `data`
    drawn with replacement (seeded by `seed`), by `recipes.train.train`.

    Returns (the trained model, its loss curve): with `curve_every` > 0 the curve is
    the full-`data` loss before training and after every `curve_every`-th step, else [].
    """
    x, y = data

    def batches(step):
        rng = np.random.default_rng(seed)
        for _ in range(step):  # the draws before `step`, so a stream from `step` matches
            rng.integers(0, len(y), batch)
        while True:
            idx = rng.integers(0, len(y), batch)
            yield {"x": x[idx], "y": y[idx]}

    curve = curve_every > 0
    result = train_loop(
        model,
        None,
        loss_fn=_loss_fn,
        optimizer=optax.adam(1.0),
        schedule=optax.cosine_decay_schedule(lr, steps),
        train_data=batches,
        config=TrainConfig(steps=steps, log_every=0, eval_every=curve_every, progress=False),
        eval_fn=(lambda m, s, b: {"loss": _losses(m, b)}) if curve else None,
        eval_data=(lambda: [{"x": x, "y": y}]) if curve else None,
    )
    if not curve:
        return result.model, []
    first = float(jnp.mean(eqx.filter_jit(_losses)(model, {"x": x, "y": y})))
    evals = [r for r in result.history if r["split"] == "eval" and r["step"] % curve_every == 0]
    return result.model, [first, *(r["loss"] for r in evals)]
