"""What the compress recipe needs from a pretrained model, as a `Subject`: how to load
it, feed it calibration and evaluation data, measure a compressed copy against the
dense original, and distill the copy from the original (the healing loss). The
families are in recipes/_compress_text.py and recipes/_compress_vision.py.

Every subject keeps its evaluation data fixed, so the dense, compressed and healed
models are measured on the same inputs. The healing state is `(teacher, bn_state)`:
the dense model rides along in the trainer's state (it gets no gradient), and the
CNNs' BatchNorm statistics stay at their pretrained values (both models run in
inference mode).
"""

from collections.abc import Iterator

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree
from tqdm.auto import tqdm

from ._compress_config import CompressConfig
from ._report import seconds_in_turns
from .config import ConfigError
from .train import Batch


def batches(arrays: dict[str, np.ndarray], size: int) -> list[Batch]:
    n = len(next(iter(arrays.values())))
    return [{k: v[i : i + size] for k, v in arrays.items()} for i in range(0, n, size)]


def data_error(error: ValueError, keys: str) -> ConfigError:
    return ConfigError(f"{keys}: {error}")


class Subject:
    """A dense pretrained model and its data. Subclasses set `target` (the layers to
    factorize by default) and implement the model-specific methods."""

    target: str = ""
    curve_keys: tuple[str, ...] = ()
    state: PyTree = None  # BatchNorm statistics (CNNs)

    def __init__(self, config: CompressConfig):
        self.config = config
        self.heal = config.heal
        self.progress = config.progress
        self._forward = eqx.filter_jit(self.forward)
        self.dense, self.calibration_set, self.evaluation_set = None, {}, {}
        self.sources: dict[str, tuple[str, ...]] = {}

    # ---- model-specific
    def forward(self, model, state, batch: Batch) -> Array:
        """The model's outputs on a batch (logits or embeddings)."""
        raise NotImplementedError

    def evaluate(self, model) -> dict[str, float]:
        """The quality metrics of `model` on the evaluation data."""
        raise NotImplementedError

    def heal_loss(self, model, state, batch: Batch, key) -> tuple[Array, tuple[PyTree, dict]]:
        """The trainer's loss_fn: distillation from the teacher in `state`."""
        raise NotImplementedError

    def heal_eval(self, model, state, batch: Batch) -> dict[str, Array]:
        """The trainer's eval_fn: per-example closeness to the teacher."""
        raise NotImplementedError

    def activations(self, target: str) -> dict | None:
        """What follows each layer, for function-aware initializers."""
        return None

    def curve_point(self, measured: dict[str, float]) -> dict[str, float]:
        """`heal_eval`'s metrics (averaged over the evaluation data) read off what
        `evaluate` measured, for the start of the healing curve."""
        return {k: measured[k] for k in self.curve_keys}

    # ---- shared
    def calibration(self):
        """A fixed `calibration=` for `lowrank.factorize`: runs the model on the
        calibration inputs."""
        batch = {k: jnp.asarray(v) for k, v in self.calibration_set.items()}
        return lambda model: self.forward(model, self.state, batch)

    def example(self):
        """One evaluation example (for FLOP counts and FLOP budgets)."""
        one = {k: jnp.asarray(v[:1]) for k, v in self.evaluation_set.items()}
        return lambda model: self.forward(model, self.state, one)

    def eval_batches(self) -> list[Batch]:
        return batches(self.evaluation_set, self.config.data.batch_size)

    def _outputs(self, model, desc: str) -> Iterator[tuple[Batch, Array]]:
        batches = self.eval_batches()
        for batch in tqdm(batches, desc=desc, leave=False, disable=not self.progress):
            yield batch, self._forward(model, self.state, batch)

    def heal_batches(self, step: int) -> Iterator[Batch]:
        """Healing batches from global step `step` on: `heal.batch_size` calibration
        examples per step, drawn by a generator seeded with the step."""
        n = len(next(iter(self.calibration_set.values())))
        while True:
            rng = np.random.default_rng([self.config.seed, step])
            rows = np.sort(rng.choice(n, self.heal.batch_size, replace=False))
            yield {k: v[rows] for k, v in self.calibration_set.items()}
            step += 1

    def forward_seconds(self, models: list[PyTree]) -> list[float]:
        """Seconds per forward pass over one evaluation batch, the models in turns."""
        batch = self.eval_batches()[0]
        return seconds_in_turns(self._forward, models, self.state, batch, rounds=2, repeats=3)

    def generate(self, model) -> str | None:
        """Greedy continuation of the config's prompt (language models only)."""
        return None
