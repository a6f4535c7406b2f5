"""The pretrained models the compress recipe knows, one `Subject` per family: how to
load it, feed it calibration and evaluation data, measure a compressed copy against
the dense original, and distill the copy from the original (the healing loss).

Every subject keeps its evaluation data fixed, so the dense, compressed and healed
models are measured on the same inputs. The healing state is `(teacher, bn_state)`:
the dense model rides along in the trainer's state (it gets no gradient), and the
CNNs' BatchNorm statistics stay at their pretrained values (both models run in
inference mode).
"""

import functools
import math
from collections.abc import Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree
from tqdm.auto import tqdm

from . import data, metrics, pretrained
from ._compress_config import CompressConfig
from ._factorize_policy import normalized_activations
from ._report import seconds_in_turns
from .config import ConfigError
from .distill import cosine_distance_loss, kd_loss, kd_token_losses
from .models import BATCH_AXIS, generate_greedy
from .train import Batch


def _batches(arrays: dict[str, np.ndarray], size: int) -> list[Batch]:
    n = len(next(iter(arrays.values())))
    return [{k: v[i : i + size] for k, v in arrays.items()} for i in range(0, n, size)]


def _data_error(error: ValueError, keys: str) -> ConfigError:
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
        return _batches(self.evaluation_set, self.config.data.batch_size)

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


class LanguageModel(Subject):
    """SmolLM2-135M-Instruct on BBC News token windows: perplexity and bits per byte."""

    target = r"blocks\.\d+\.(attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"

    def __init__(self, config: CompressConfig):
        super().__init__(config)
        d = config.data
        split = _bbc(d.eval_categories)
        self.dense, self.tokenizer = pretrained.smollm2(config.model.num_layers)
        try:
            windows = [
                data.token_windows(self.tokenizer, texts, d.seq_len + 1, count, seed=d.seed)
                for texts, count in (
                    (split.calibration, d.calibration),
                    (split.evaluation, d.evaluation),
                )
            ]
        except ValueError as e:
            raise _data_error(e, "data.calibration / data.evaluation / data.seq_len") from e
        self.calibration_set, self.evaluation_set = {"ids": windows[0]}, {"ids": windows[1]}
        self.n_bytes = data.text_bytes(self.tokenizer, windows[1][:, 1:])
        self.sources = {"calibration": split.calibration_from, "evaluation": split.evaluation_from}

    def forward(self, model, state, batch):
        return jax.vmap(model)(batch["ids"][:, :-1])

    def activations(self, target):
        return {r"blocks\.\d+\.mlp\.gate_proj": jax.nn.silu, r".*": None}

    def evaluate(self, model):
        losses, kl, count = [], 0.0, 0
        for batch, logits in self._outputs(model, "evaluating"):
            dense = self._forward(self.dense, None, batch)
            losses.append(np.asarray(metrics.token_losses(logits, batch["ids"][:, 1:])))
            kl += float(metrics.kl_divergence(dense, logits)) * len(logits)
            count += len(logits)
        losses = np.concatenate(losses)
        return {
            "perplexity": float(metrics.perplexity(losses)),
            "bits_per_byte": float(metrics.bits_per_byte(losses, self.n_bytes)),
            "kl_to_dense": kl / count,
        }

    def curve_point(self, measured):
        return {
            "cross_entropy": math.log(measured["perplexity"]),
            "kl_to_dense": measured["kl_to_dense"],
        }

    def _logits(self, model, state, batch):
        teacher, _ = state
        x, y = batch["ids"][:, :-1], batch["ids"][:, 1:]
        return jax.vmap(model)(x), jax.vmap(teacher)(x), y

    def heal_loss(self, model, state, batch, key):
        s, t, y = self._logits(model, state, batch)
        h = self.heal
        loss = kd_loss(s, t, y, alpha=h.alpha, temperature=h.temperature)
        return loss, (state, {"ce": metrics.token_losses(s, y).mean()})

    def heal_eval(self, model, state, batch):
        s, t, y = self._logits(model, state, batch)
        kl = kd_token_losses(s, t, y, alpha=1.0, temperature=1.0)
        return {"cross_entropy": metrics.token_losses(s, y).mean(-1), "kl_to_dense": kl.mean(-1)}

    def generate(self, model):
        g = self.config.generate
        if not g.max_new_tokens:
            return None
        return generate_greedy(model, g.prompt, g.max_new_tokens, tokenizer=self.tokenizer)


def _bbc(categories: tuple[str, ...]) -> data.TextSplit:
    try:
        return data.bbc_split(evaluation=categories)
    except ValueError as e:
        raise _data_error(e, f"data.eval_categories={categories!r}") from e


def _paragraphs(articles: tuple[str, ...]) -> list[str]:
    """The body paragraphs of articles (each article's first line is its title)."""
    return [p.strip() for a in articles for p in a.split("\n")[1:] if p.strip()]


class Encoder(Subject):
    """all-MiniLM-L6-v2: calibrated and healed on BBC token windows, evaluated on
    paragraphs of other categories by cosine similarity to the dense embeddings and
    nearest-neighbour agreement."""

    target = (
        r"layers\.\d+\.(attention\.(query|key|value|output\.dense)|intermediate\.dense"
        r"|output\.dense)"
    )
    curve_keys = ("cosine_to_dense",)

    def __init__(self, config: CompressConfig):
        super().__init__(config)
        d = config.data
        split = _bbc(d.eval_categories)
        self.dense, tokenizer = pretrained.minilm(config.model.num_layers, max_length=d.seq_len)
        try:
            body = data.token_windows(
                tokenizer, split.calibration, d.seq_len - 2, d.calibration, seed=d.seed
            )
        except ValueError as e:
            raise _data_error(e, "data.calibration / data.seq_len") from e
        ends = [
            np.full((len(body), 1), tokenizer.token_to_id(t), np.int32) for t in ("[CLS]", "[SEP]")
        ]
        windows = np.concatenate([ends[0], body, ends[1]], axis=1)
        self.calibration_set = {"ids": windows, "attention_mask": np.ones_like(windows)}
        paragraphs = _paragraphs(split.evaluation)
        if d.evaluation > len(paragraphs):
            raise ConfigError(
                f"data.evaluation={d.evaluation} exceeds the {len(paragraphs)} paragraphs of "
                f"the evaluation categories {split.evaluation_from}; ask for fewer."
            )
        rng = np.random.default_rng(d.seed)
        picked = [
            paragraphs[i] for i in np.sort(rng.choice(len(paragraphs), d.evaluation, replace=False))
        ]
        ids, mask = data.tokenize(tokenizer, picked)
        self.evaluation_set = {"ids": ids, "attention_mask": mask}
        self.sources = {"calibration": split.calibration_from, "evaluation": split.evaluation_from}

    def forward(self, model, state, batch):
        return jax.vmap(model)(batch["ids"], batch["attention_mask"])

    def activations(self, target):
        gelu = functools.partial(jax.nn.gelu, approximate=False)
        return {r"layers\.\d+\.intermediate\.dense": gelu, r".*": None}

    def evaluate(self, model):
        if not hasattr(self, "_dense_embeddings"):
            self._dense_embeddings = np.concatenate(
                [np.asarray(e) for _, e in self._outputs(self.dense, "dense")]
            )
        embeddings = np.concatenate([np.asarray(e) for _, e in self._outputs(model, "evaluating")])
        dense = self._dense_embeddings
        return {
            "cosine_to_dense": float(metrics.cosine_similarity(dense, embeddings)),
            "nn_agreement": float(metrics.nearest_neighbour_agreement(dense, embeddings)),
        }

    def heal_loss(self, model, state, batch, key):
        teacher, _ = state
        ids, mask = batch["ids"], batch["attention_mask"]
        last = lambda m: jax.vmap(lambda i, k: m.hidden_states(i, k)[-1])(ids, mask)
        loss = cosine_distance_loss(last(model), last(teacher), mask=mask)
        return loss, (state, {})

    def heal_eval(self, model, state, batch):
        teacher, _ = state
        s, t = self.forward(model, None, batch), self.forward(teacher, None, batch)
        cos = jnp.sum(s * t, -1) / jnp.maximum(
            jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1), 1e-12
        )
        return {"cosine_to_dense": cos}


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
            shift = step * size % len(names)
            rotated = names[shift:] + names[:shift]
            yield {"image": self._crops(rotated, size, seed=seed + 1 + step)}
            step += 1

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


SUBJECTS = {
    "smollm2": LanguageModel,
    "minilm": Encoder,
    "mobilenet_v2": Classifier,
    "efficientnet_lite0": Classifier,
}
"""The `Subject` class for each `model.name`."""
