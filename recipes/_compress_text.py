"""The text models of the compress recipe: SmolLM2 (a causal LM) and MiniLM (a
sentence encoder), calibrated on BBC News token windows from some categories and
evaluated on the others."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import data, metrics, pretrained
from ._compress_config import CompressConfig
from ._compress_subject import Subject, data_error
from .config import ConfigError
from .distill import cosine_distance_loss, kd_loss, kd_token_losses
from .models import generate_greedy


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
            raise data_error(e, "data.calibration / data.evaluation / data.seq_len") from e
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
        raise data_error(e, f"data.eval_categories={categories!r}") from e


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
            raise data_error(e, "data.calibration / data.seq_len") from e
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
        last = lambda m: jax.vmap(m.last_hidden_state)(ids, mask)
        loss = cosine_distance_loss(last(model), last(teacher), mask=mask)
        return loss, (state, {})

    def heal_eval(self, model, state, batch):
        teacher, _ = state
        s, t = self.forward(model, None, batch), self.forward(teacher, None, batch)
        cos = jnp.sum(s * t, -1) / jnp.maximum(
            jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1), 1e-12
        )
        return {"cosine_to_dense": cos}
