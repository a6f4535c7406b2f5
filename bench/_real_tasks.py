"""The models of bench/compress_real.py: what each compresses, how it is calibrated and
scored (`Task`), at the full or the --quick data sizes (`Sizes`)."""

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from bench import peers
from recipes import metrics
from recipes.data import (
    bbc_split,
    photo_crops,
    photo_split,
    text_bytes,
    token_windows,
    tokenize,
)
from recipes.models import BATCH_AXIS
from recipes.policy import normalized_activations


@dataclass
class Sizes:
    """Data sizes of one run (full or --quick)."""

    llm_layers: int | None = None
    llm_calibration: tuple[int, int] = (128, 256)  # windows x tokens
    llm_evaluation: tuple[int, int] = (32, 256)  # windows x predicted tokens
    llm_search_windows: int = 8
    blocks_per_stage: int | None = None
    image_size: int = 224
    calibration_crops: int = 256
    evaluation_crops: int = 512
    search_crops: int = 64
    encoder_layers: int | None = None
    text_tokens: int = 128
    calibration_texts: int = 256
    evaluation_texts: int = 512
    search_texts: int = 64
    chunk: int = 4  # LM windows / 16x images / 16x texts per evaluation call
    search_candidates: tuple[float, ...] = peers.ASVD_RATIOS


QUICK = Sizes(
    llm_layers=2,
    llm_calibration=(4, 32),
    llm_evaluation=(2, 32),
    llm_search_windows=2,
    blocks_per_stage=1,
    image_size=64,
    calibration_crops=16,
    evaluation_crops=16,
    search_crops=8,
    encoder_layers=2,
    text_tokens=32,
    calibration_texts=16,
    evaluation_texts=16,
    search_texts=8,
    search_candidates=(0.4, 0.8),
)


@dataclass
class Task:
    """One model: what to compress, how to calibrate, how to score."""

    name: str
    title: str
    model: eqx.Module
    target: str
    calibration: Callable  # fn(model), as lowrank.factorize takes it
    activations: dict
    evaluate: Callable[[eqx.Module], dict[str, float]]
    search_loss: Callable[[eqx.Module], float]
    search_candidates: tuple[float, ...]
    columns: list[str]  # metric names, in table order
    notes: list[str] = field(default_factory=list)
    # The calibration as a batch of model inputs, where the model takes one, for
    # Budget(by="output"): its probes differentiate a batch in chunks, a callable whole.
    calibration_batch: jax.Array | None = None


def _chunks(n: int, size: int):
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


# ---------------------------------------------------------------- SmolLM2 on BBC


def smollm2_task(sizes: Sizes) -> Task:
    from recipes.pretrained import smollm2

    model, tokenizer = smollm2(num_layers=sizes.llm_layers)
    split = bbc_split()
    (n_cal, t_cal), (n_eval, t_eval) = sizes.llm_calibration, sizes.llm_evaluation
    calibration_ids = jnp.asarray(token_windows(tokenizer, split.calibration, t_cal, n_cal, seed=0))
    windows = token_windows(tokenizer, split.evaluation, t_eval + 1, n_eval, seed=1)
    inputs, targets = jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, 1:])
    n_bytes = text_bytes(tokenizer, windows[:, 1:])

    @eqx.filter_jit
    def losses(m, ids, tgt):
        return metrics.token_losses(jax.vmap(m)(ids), tgt)

    def all_losses(m, ids, tgt):
        return jnp.concatenate(
            [losses(m, ids[s], tgt[s]).reshape(-1) for s in _chunks(len(ids), sizes.chunk)]
        )

    def evaluate(m):
        loss = all_losses(m, inputs, targets)
        return {
            "perplexity": float(metrics.perplexity(loss)),
            "bits/byte": float(metrics.bits_per_byte(loss, n_bytes)),
        }

    search_ids = calibration_ids[: sizes.llm_search_windows]

    def search_loss(m):  # ASVD: perplexity on calibration data
        return float(metrics.perplexity(all_losses(m, search_ids[:, :-1], search_ids[:, 1:])))

    layers = "" if sizes.llm_layers is None else f", first {sizes.llm_layers} blocks"
    return Task(
        name="smollm2",
        title=f"SmolLM2-135M-Instruct on BBC News{layers}",
        model=model,
        target=r"blocks\.\d+\.(attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
        calibration=lambda m: jax.vmap(m.last_hidden_state)(calibration_ids),  # no head logits
        calibration_batch=calibration_ids,  # vmap(m)(ids): the output probes' logits
        activations={
            r".*\.mlp\.gate_proj": jax.nn.silu,
            r".*\.(attn\.(q|k|v|o)_proj|mlp\.(up|down)_proj)": None,
        },
        evaluate=evaluate,
        search_loss=search_loss,
        search_candidates=sizes.search_candidates,
        columns=["perplexity", "bits/byte"],
        notes=[
            (
                f"Calibration: {n_cal} windows x {t_cal} tokens from BBC {', '.join(split.calibration_from)}; "
                f"evaluation: {n_eval} windows x {t_eval} next-token predictions ({n_bytes:,} bytes) "
                f"from {', '.join(split.evaluation_from)} (BBC News: research use only). "
                "Selected: q/k/v/o/gate/up/down of every block; embeddings (tied head) and norms dense."
            ),
        ],
    )


# ---------------------------------------------------------------- CNNs on photo crops


_CNNS = {  # name: (loader and normalization in recipes.pretrained, title)
    "mobilenet_v2": (
        "mobilenet_v2",
        "MOBILENET_V2_NORMALIZATION",
        "MobileNetV2 (torchvision ImageNet)",
    ),
    "efficientnet_lite0": (
        "efficientnet_lite0",
        "EFFICIENTNET_LITE0_NORMALIZATION",
        "EfficientNet-Lite0 (ImageNet)",
    ),
}


def cnn_task(name: str, sizes: Sizes) -> Task:
    from recipes import pretrained

    loader, normalization, title = _CNNS[name]
    model, state = getattr(pretrained, loader)(blocks_per_stage=sizes.blocks_per_stage)
    normalization = getattr(pretrained, normalization)
    split = photo_split(seed=0)
    crops = functools.partial(photo_crops, normalization=normalization, size=sizes.image_size)
    calibration = jnp.asarray(crops(split.calibration, sizes.calibration_crops, seed=0))
    evaluation = jnp.asarray(crops(split.evaluation, sizes.evaluation_crops, seed=1))
    search = calibration[: sizes.search_crops]
    convs = r"stages\.\d+\.blocks\.\d+\.(expand|project)\.conv|head\.conv"
    target = convs + "|classifier"

    @eqx.filter_jit
    def logits(m, images):
        return jax.vmap(lambda x: m(x, state, inference=True)[0], axis_name=BATCH_AXIS)(images)

    def all_logits(m, images):
        return jnp.concatenate(
            [logits(m, images[s]) for s in _chunks(len(images), 16 * sizes.chunk)]
        )

    dense = all_logits(model, evaluation)
    dense_search = all_logits(model, search)

    def evaluate(m):
        out = all_logits(m, evaluation)
        return {
            "KL": float(metrics.kl_divergence(dense, out)),
            "top-1 agreement": float(metrics.top1_agreement(dense, out)),
        }

    blocks = (
        ""
        if sizes.blocks_per_stage is None
        else f", first {sizes.blocks_per_stage} block(s) per stage"
    )
    return Task(
        name=name,
        title=f"{title} on photo crops{blocks}",
        model=model,
        target=target,
        calibration=lambda m: logits(m, calibration),
        activations={**normalized_activations(model, state, convs), "classifier": None},
        evaluate=evaluate,
        search_loss=lambda m: float(metrics.kl_divergence(dense_search, all_logits(m, search))),
        search_candidates=sizes.search_candidates,
        columns=["KL", "top-1 agreement"],
        notes=[
            (
                f"Calibration: {len(calibration)} crops of {', '.join(split.calibration)}; evaluation: "
                f"{len(evaluation)} crops of {', '.join(split.evaluation)} ({sizes.image_size}x"
                f"{sizes.image_size}). Selected: 1x1 expand/project convs, the head conv and the "
                "classifier; stem and depthwise convs dense. ASVD's sensitivity uses KL to dense on "
                f"{len(search)} calibration crops (no labels: the paper's perplexity has no "
                "counterpart here)."
            ),
        ],
    )


# ---------------------------------------------------------------- MiniLM on BBC paragraphs


def _paragraphs(articles, count: int, seed: int) -> list[str]:
    paragraphs = [p for a in articles for p in a.split("\n") if len(p.split()) >= 30]
    pick = np.random.default_rng(seed).permutation(len(paragraphs))[:count]
    return [paragraphs[i] for i in np.sort(pick)]


def minilm_task(sizes: Sizes) -> Task:
    from recipes.pretrained import minilm

    model, tokenizer = minilm(num_layers=sizes.encoder_layers, max_length=sizes.text_tokens)
    split = bbc_split()
    cal_ids, cal_mask = map(
        jnp.asarray, tokenize(tokenizer, _paragraphs(split.calibration, sizes.calibration_texts, 0))
    )
    ev_ids, ev_mask = map(
        jnp.asarray, tokenize(tokenizer, _paragraphs(split.evaluation, sizes.evaluation_texts, 1))
    )

    @eqx.filter_jit
    def embed(m, ids, mask):
        return jax.vmap(m)(ids, mask)

    def all_embed(m, ids, mask):
        return jnp.concatenate(
            [embed(m, ids[s], mask[s]) for s in _chunks(len(ids), 16 * sizes.chunk)]
        )

    dense = all_embed(model, ev_ids, ev_mask)
    n_search = sizes.search_texts
    dense_search = all_embed(model, cal_ids[:n_search], cal_mask[:n_search])

    def evaluate(m):
        out = all_embed(m, ev_ids, ev_mask)
        return {
            "cosine to dense": float(metrics.cosine_similarity(dense, out)),
            "NN agreement": float(metrics.nearest_neighbour_agreement(dense, out)),
        }

    def search_loss(m):
        out = all_embed(m, cal_ids[:n_search], cal_mask[:n_search])
        return 1.0 - float(metrics.cosine_similarity(dense_search, out))

    layers = "" if sizes.encoder_layers is None else f", first {sizes.encoder_layers} layers"
    return Task(
        name="minilm",
        title=f"all-MiniLM-L6-v2 on BBC paragraphs{layers}",
        model=model,
        target=r"layers\.\d+\..*",
        calibration=lambda m: embed(m, cal_ids, cal_mask),
        activations={
            r".*\.intermediate\.dense": functools.partial(jax.nn.gelu, approximate=False),
            r"layers\.\d+\.(attention\.(query|key|value|output\.dense)|output\.dense)": None,
        },
        evaluate=evaluate,
        search_loss=search_loss,
        search_candidates=sizes.search_candidates,
        columns=["cosine to dense", "NN agreement"],
        notes=[
            (
                f"Calibration: {len(cal_ids)} paragraphs (>= 30 words) from BBC "
                f"{', '.join(split.calibration_from)}; evaluation: {len(ev_ids)} from "
                f"{', '.join(split.evaluation_from)}; {sizes.text_tokens} tokens (padded/truncated). "
                "Selected: every linear of every layer. ASVD's sensitivity uses 1 - cosine to dense "
                f"on {n_search} calibration paragraphs."
            ),
        ],
    )
