"""The ImageNet CNNs of the compress recipe (MobileNetV2, EfficientNet-Lite0), on
random crops of disjoint photographs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import data, metrics, pretrained
from ._compress_config import CompressConfig
from ._compress_subject import Subject
from ._factorize_policy import normalized_activations
from .distill import kd_loss, kd_token_losses
from .models import BATCH_AXIS


class Classifier(Subject):
    """An ImageNet CNN on random crops of photographs: KL to the dense model and top-1
    agreement. Healing crops are fresh every step, from the calibration photographs."""

    target = r"stages\.\d+\.blocks\.\d+\.(expand|project)\.conv|head\.conv|classifier"
    curve_keys = ("kl_to_dense", "top1_agreement")

    def __init__(self, config: CompressConfig):
        super().__init__(config)
        d, m = config.data, config.model
        load, self.normalization = {
            "mobilenet_v2": (pretrained.mobilenet_v2, pretrained.MOBILENET_V2_NORMALIZATION),
            "efficientnet_lite0": (
                pretrained.efficientnet_lite0,
                pretrained.EFFICIENTNET_LITE0_NORMALIZATION,
            ),
        }[m.name]
        self.dense, self.state = load(blocks_per_stage=m.blocks_per_stage)
        self.split = data.photo_split(seed=d.seed)
        crops = functools.partial(
            data.photo_crops, normalization=self.normalization, size=d.image_size
        )
        self._crops = crops
        self.calibration_set = {"image": crops(self.split.calibration, d.calibration, seed=d.seed)}
        self.evaluation_set = {"image": crops(self.split.evaluation, d.evaluation, seed=d.seed)}
        self.sources = {"calibration": self.split.calibration, "evaluation": self.split.evaluation}

    def forward(self, model, state, batch):
        run = lambda x: model(x, state, inference=True)[0]
        return jax.vmap(run, axis_name=BATCH_AXIS)(batch["image"])

    def activations(self, target):
        # What the network does to each conv's output next (its BatchNorm, then ReLU6
        # or nothing); the classifier feeds the softmax. A dot in the path excludes
        # the top-level classifier from the conv lookup.
        convs = normalized_activations(self.dense, self.state, rf"(?=.*\.)(?:{target})")
        return {**convs, "classifier": None}

    def evaluate(self, model):
        if not hasattr(self, "_dense_logits"):
            self._dense_logits = np.concatenate(
                [np.asarray(o) for _, o in self._outputs(self.dense, "dense")]
            )
        logits = np.concatenate([np.asarray(o) for _, o in self._outputs(model, "evaluating")])
        dense = self._dense_logits
        return {
            "kl_to_dense": float(metrics.kl_divergence(dense, logits)),
            "top1_agreement": float(metrics.top1_agreement(dense, logits)),
        }

    def heal_batches(self, step):
        names, size, seed = self.split.calibration, self.heal.batch_size, self.config.data.seed
        while True:
            yield {"image": self._heal_crops(names, size, seed, step)}
            step += 1

    def _heal_crops(self, names, size: int, seed: int, step: int) -> np.ndarray:
        """Step `step`'s crops, taken in turn from the calibration photographs from a
        shifting start; with `heal.mixup`, each mixed with a crop of another of them."""
        shift = step * size % len(names)
        crops = self._crops(names[shift:] + names[:shift], size, seed=seed + 1 + step)
        if not self.heal.mixup:
            return crops
        rng = np.random.default_rng([seed, step])
        other = (shift + int(rng.integers(1, max(len(names), 2)))) % len(names)
        partners = self._crops(names[other:] + names[:other], size, seed=int(rng.integers(2**31)))
        weight = rng.beta(self.heal.mixup, self.heal.mixup, size)[:, None, None, None]
        return (weight * crops + (1 - weight) * partners).astype(np.float32)

    def _logits(self, model, state, batch):
        teacher, bn = state
        return self.forward(model, bn, batch), self.forward(teacher, bn, batch)

    def heal_loss(self, model, state, batch, key):
        s, t = self._logits(model, state, batch)
        h = self.heal
        loss = kd_loss(s, t, jnp.argmax(t, -1), alpha=h.alpha, temperature=h.temperature)
        return loss, (state, {"top1_agreement": metrics.top1_agreement(t, s)})

    def heal_eval(self, model, state, batch):
        s, t = self._logits(model, state, batch)
        kl = kd_token_losses(s, t, jnp.argmax(t, -1), alpha=1.0, temperature=1.0)
        return {
            "kl_to_dense": kl,
            "top1_agreement": (jnp.argmax(s, -1) == jnp.argmax(t, -1)).astype(jnp.float32),
        }
