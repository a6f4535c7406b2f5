"""The compress recipes end to end on small slices of the pretrained models, and their
config errors (which come before any model is loaded)."""

import dataclasses
import json
import math
import re
import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank
from recipes import data, pretrained
from recipes.compress import compress, format_table
from recipes.config import ConfigError, load_config
from recipes.models import BATCH_AXIS
from recipes.run import main

QUIET = ["progress=false", "heal.steps=2", "heal.batch_size=2", "heal.log_every=1"]


def _config(name, tmp_path, *overrides):
    return load_config(name, [*QUIET, f"out_dir={tmp_path}", *overrides])


def _log_softmax64(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _files(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_smollm2_slice_compresses_heals_generates_and_saves(tmp_path, capsys):
    config = _config(
        "compress_smollm2",
        tmp_path,
        "model.num_layers=2",
        "data.calibration=4",
        "data.evaluation=2",
        "data.seq_len=16",
        "data.batch_size=2",
        "factorize.rank=params:0.8",
        "factorize.budget_by=weights",  # the data-aware budget: minilm's test
        "generate.max_new_tokens=4",
    )
    result = compress(config)
    report = result.report
    printed = capsys.readouterr().out
    models = report["models"]
    assert list(models) == ["dense", "compressed", "healed"]
    assert models["compressed"]["params"] < models["dense"]["params"]
    assert report["target_params_after"] <= 0.8 * report["target_params_before"]
    assert models["compressed"]["flops"] < models["dense"]["flops"]
    assert set(report["data"]["calibration"]).isdisjoint(report["data"]["evaluation"])
    for name in ("perplexity", "bits per byte", "parameters", "FLOPs", "forward pass"):
        assert name in printed
    assert set(report["generation"]) == {"prompt", "dense", "compressed", "healed"}
    assert "heal.png" in _files(tmp_path) and "model.plan.json" in _files(tmp_path)
    assert [r["step"] for r in result.train.history if r["split"] == "eval"] == [0, 2]

    # the report's perplexity and bits per byte, recomputed in float64 from the saved model
    dense, tokenizer = pretrained.smollm2(2)
    loaded = lowrank.load(tmp_path / "model.eqx", dense)
    split = data.bbc_split(("entertainment", "tech"))
    windows = data.token_windows(tokenizer, split.evaluation, 17, 2, seed=0)
    logits = np.asarray(jax.vmap(loaded)(jnp.asarray(windows[:, :-1])))
    losses = -np.take_along_axis(_log_softmax64(logits), windows[:, 1:, None], -1)
    healed = models["healed"]
    np.testing.assert_allclose(healed["perplexity"], math.exp(losses.mean()), rtol=1e-3)
    n_bytes = data.text_bytes(tokenizer, windows[:, 1:])
    np.testing.assert_allclose(
        healed["bits_per_byte"], losses.sum() / math.log(2) / n_bytes, rtol=1e-3
    )
    # the loaded model is the healed one, not the unhealed factorization
    final = np.asarray(jax.vmap(result.train.model)(jnp.asarray(windows[:, :-1])))
    np.testing.assert_allclose(logits, final, rtol=1e-4, atol=1e-4)


def _crop_logits(model, state, images):
    run = lambda x: model(x, state, inference=True)[0]
    return np.asarray(jax.vmap(run, axis_name=BATCH_AXIS)(jnp.asarray(images)))


def _unfactorized_arrays(model) -> dict[str, np.ndarray]:
    """The model's arrays outside its factorized layers, by path."""
    factorized = lambda node: isinstance(node, (lowrank.LowRankLinear, lowrank.LowRankConv))
    leaves = jax.tree_util.tree_leaves_with_path(
        eqx.filter(model, eqx.is_array), is_leaf=factorized
    )
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves if not factorized(v)}


@pytest.mark.parametrize(
    "name,load,normalization,train",
    [
        ("mobilenet_v2", pretrained.mobilenet_v2, pretrained.MOBILENET_V2_NORMALIZATION, "all"),
        (
            "efficientnet_lite0",
            pretrained.efficientnet_lite0,
            pretrained.EFFICIENTNET_LITE0_NORMALIZATION,
            "factors",
        ),
    ],
)
def test_cnn_slice_compresses_heals_and_saves(tmp_path, capsys, name, load, normalization, train):
    config = _config(
        f"compress_{name}",
        tmp_path,
        f"heal.train={train}",
        "model.blocks_per_stage=1",
        "data.calibration=4",
        "data.evaluation=4",
        "data.image_size=32",
        "data.batch_size=4",
        "factorize.rank=params:0.6",
        "factorize.budget_by=weights",
    )
    report = compress(config).report
    printed = capsys.readouterr().out
    models = report["models"]
    assert "KL(dense || model)" in printed and "top-1 agreement" in printed
    assert models["dense"]["kl_to_dense"] == pytest.approx(0.0, abs=1e-6)
    assert models["compressed"]["params"] < models["dense"]["params"]
    assert set(report["data"]["calibration"]).isdisjoint(report["data"]["evaluation"])
    assert {"heal.png", "heal_metrics.jsonl", "report.json"} <= set(_files(tmp_path))

    # KL and top-1 agreement of the saved (healed) model, recomputed in float64
    dense, state = load(blocks_per_stage=1)
    loaded = lowrank.load(tmp_path / "model.eqx", dense)
    split = data.photo_split(seed=0)
    images = data.photo_crops(split.evaluation, 4, normalization=normalization, size=32, seed=0)
    p, q = (
        _log_softmax64(_crop_logits(dense, state, images)),
        _log_softmax64(_crop_logits(loaded, state, images)),
    )
    kl = (np.exp(p) * (p - q)).sum(-1).mean()
    np.testing.assert_allclose(models["healed"]["kl_to_dense"], kl, rtol=1e-3, atol=1e-6)
    agree = (p.argmax(-1) == q.argmax(-1)).mean()
    assert models["healed"]["top1_agreement"] == pytest.approx(agree)

    # heal.train="factors" keeps every other array at its pretrained value; "all" does not
    kept, pretrained_arrays = _unfactorized_arrays(loaded), _unfactorized_arrays(dense)
    same = [np.array_equal(a, pretrained_arrays[k]) for k, a in kept.items()]
    assert all(same) if train == "factors" else not all(same)


def test_classifier_heal_crops_mix_two_photographs_with_beta_weights():
    """With heal.mixup, each healing crop is w·a + (1 - w)·b, w ~ Beta(mixup, mixup), a the
    unmixed crop and b a crop of another photograph. Crops are stubbed as one-hot
    vectors of their photograph, so a mixture shows both photographs and its weight."""
    from recipes._compress_vision import Classifier

    names = tuple(f"photo{i}" for i in range(7))
    subject = Classifier.__new__(Classifier)  # no model: only the batches are under test
    subject.config = load_config("compress_mobilenet_v2", [])
    subject.split = dataclasses.replace(data.photo_split(seed=0), calibration=names)

    def crops(names_, count, seed):
        photo = [int(names_[i % len(names_)][-1]) for i in range(count)]
        return np.eye(len(names), dtype=np.float32)[photo][:, :, None, None]

    subject._crops = crops
    subject.heal = dataclasses.replace(subject.config.heal, batch_size=5, mixup=0.0)
    stream = subject.heal_batches(3)
    unmixed = [next(stream)["image"][:, :, 0, 0] for _ in range(40)]
    subject.heal = dataclasses.replace(subject.heal, mixup=2.0)
    stream = subject.heal_batches(3)
    weights = []
    for a in unmixed:
        x = next(stream)["image"][:, :, 0, 0]
        assert x.dtype == np.float32
        own = a.argmax(1)
        w = x[np.arange(5), own]
        rest = x.copy()
        rest[np.arange(5), own] = 0
        partner = rest.argmax(1)
        assert np.all(partner != own)
        np.testing.assert_allclose(rest[np.arange(5), partner], 1 - w, atol=1e-6)
        np.testing.assert_allclose(rest.sum(1), 1 - w, atol=1e-6)  # exactly two photographs
        weights.append(w)
    weights = np.concatenate(weights)
    # Beta(2, 2): inside (0, 1), mean 1/2, standard deviation 1/sqrt(20) = 0.224
    assert np.all((weights > 0) & (weights < 1))
    assert abs(weights.mean() - 0.5) < 0.06 and 0.17 < weights.std() < 0.28


def test_minilm_through_the_cli_reports_cosine_and_neighbours(tmp_path, capsys):
    main(
        [
            "compress_minilm",
            "--set",
            *QUIET,
            f"out_dir={tmp_path}",
            "model.num_layers=1",
            "data.calibration=4",
            "data.evaluation=4",
            "data.seq_len=16",
            "data.batch_size=4",
            "factorize.budget_by=data",
        ]
    )
    printed = capsys.readouterr().out
    assert "cosine similarity to dense" in printed and "nearest-neighbour agreement" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    healed = report["models"]["healed"]
    assert 0.5 < healed["cosine_to_dense"] <= 1.0 + 1e-6 and 0 <= healed["nn_agreement"] <= 1
    assert report["models"]["dense"]["cosine_to_dense"] == pytest.approx(1.0, abs=1e-5)
    assert json.loads(printed.strip().splitlines()[-1])["eval"]["step"] == 2

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["num_layers"] == 1

    # the saved model loads back factorized, and embeds close to the dense model
    dense, tokenizer = pretrained.minilm(1, max_length=16)
    loaded = lowrank.load(tmp_path / "model.eqx", dense)
    assert isinstance(loaded.layers[0].intermediate.dense, lowrank.LowRankLinear)
    ids, mask = data.tokenize(tokenizer, ["The film won three awards.", "Shares fell."])
    a = np.asarray(jax.vmap(dense)(ids, mask), np.float64)
    b = np.asarray(jax.vmap(loaded)(ids, mask), np.float64)
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert np.all(cosine > 0.5) and not np.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["factorize.rank=params:1.5"], r"factorize.rank='params:1.5'.*\(0, 1\]"),
        (["factorize.rank=stable"], r"factorize.rank='stable'.*budget such as params:0.8"),
        (["factorize.init=svd"], r"factorize.init='svd' is not a registered.*whitened"),
        (["model.num_layers=31"], r"model.num_layers=31: smollm2 has 30 layers; use 1..30"),
        (
            ["model.blocks_per_stage=1"],
            r"model.blocks_per_stage=1 does not apply to .*smollm2.*"
            r"mobilenet_v2 / efficientnet_lite0",
        ),
        (["data.image_size=64"], r"data.image_size=64 does not apply.*unset it \(default 224\)"),
        (["data.seq_len=1"], r"data.seq_len=1 must be >= 2"),
        (["data.calibration=0"], r"data.calibration=0 must be positive"),
        (["heal.alpha=1.5"], r"heal.alpha=1.5 must be in \[0, 1\]"),
        (["heal.temperature=0"], r"heal.temperature=0.0 must be positive"),
        (["heal.steps=5", "optim.lr=0"], r"optim.lr=0.0 must be positive"),
        (["heal.steps=5", "heal.batch_size=0"], r"heal.batch_size=0 must be positive"),
        (
            ["heal.steps=5", "heal.batch_size=200"],
            r"heal.batch_size=200 exceeds data.calibration=128.*raise data.calibration",
        ),
        (["heal.steps=5", "optim.warmup_steps=6"], r"optim.warmup_steps=6 exceeds heal.steps=5"),
        (["heal.mixup=-1"], r"heal.mixup=-1.0 must be >= 0"),
        (
            ["heal.mixup=1"],
            r"heal.mixup=1.0 does not apply to model.name='smollm2', only to "
            r"mobilenet_v2 / efficientnet_lite0",
        ),
        (
            ["factorize.budget_by=uniform", "factorize.rank=0.5"],
            r"factorize.budget_by='uniform' applies to budgets .* not factorize.rank=0.5",
        ),
        (
            ["factorize.budget_by=data", "factorize.init=spectral"],
            r"budget_by='data' needs calibration data, which init 'spectral' does not read",
        ),
        (
            ["factorize.budget_by=output", "factorize.init=spectral"],
            r"budget_by='output' needs calibration data, which init 'spectral' does not read",
        ),
        (["factorize.rnak=0.5"], r"unknown config key 'factorize.rnak'.*'factorize.rank'"),
    ],
)
def test_smollm2_config_errors_name_the_key_before_loading(tmp_path, capsys, overrides, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress_smollm2", "--set", f"out_dir={tmp_path}", *overrides])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and len(error.strip().splitlines()) == 1
    assert re.search(message, error), error
    assert not any(tmp_path.iterdir())  # nothing computed, nothing written


@pytest.mark.parametrize(
    "name,overrides,message",
    [
        (
            "compress_mobilenet_v2",
            ["model.num_layers=2"],
            r"model.num_layers=2 does not apply to model.name='mobilenet_v2', "
            r"only to smollm2 / minilm",
        ),
        ("compress_mobilenet_v2", ["data.seq_len=64"], r"data.seq_len=64 does not apply"),
        (
            "compress_mobilenet_v2",
            ["model.blocks_per_stage=0"],
            r"model.blocks_per_stage=0 must be >= 1",
        ),
        (
            "compress_minilm",
            ["generate.max_new_tokens=5"],
            r"generate.max_new_tokens=5 does not apply to model.name='minilm', only to smollm2",
        ),
        (
            "compress_minilm",
            ["data.evaluation=1"],
            r"data.evaluation=1: nearest-neighbour .* at least 2",
        ),
        (
            "compress_minilm",
            ["data.seq_len=2"],
            r"data.seq_len=2 must be at least 3 tokens for minilm",
        ),
    ],
)
def test_model_specific_config_errors(name, overrides, message):
    with pytest.raises(ConfigError, match=message):
        compress(load_config(name, overrides))


def test_compress_needs_a_compress_config():
    with pytest.raises(ConfigError, match=r"task='image_classification' needs a CompressConfig"):
        compress(load_config("resnet18_digits"))


def test_errors_found_after_loading_name_the_key(tmp_path):
    base = ["model.num_layers=1", "data.seq_len=8", f"out_dir={tmp_path}", "progress=false"]
    with pytest.raises(ConfigError, match=r"factorize.rank='abc', factorize.target=.* on minilm: "):
        compress(load_config("compress_minilm", [*base, "factorize.rank=abc"]))
    with pytest.raises(ConfigError, match=r"data.eval_categories=\('sport',\).*pick from"):
        compress(load_config("compress_minilm", [*base, "data.eval_categories=sport"]))
    with pytest.raises(ConfigError, match=r"data.calibration / data.seq_len: .*fewer than count"):
        compress(load_config("compress_minilm", [*base, "data.calibration=10000000"]))
    with pytest.raises(ConfigError, match=r"data.evaluation=100000 exceeds the \d+ paragraphs"):
        compress(load_config("compress_minilm", [*base, "data.evaluation=100000"]))
    keys = r"data.calibration / data.evaluation / data.seq_len: .*fewer than count=1000000"
    with pytest.raises(ConfigError, match=keys):
        compress(load_config("compress_smollm2", [*base, "data.evaluation=1000000"]))
    assert not any(tmp_path.iterdir())  # nothing written before the data is there


def test_format_table_shows_every_model_and_dashes_for_missing_values():
    report = {
        "models": {
            "dense": {"params": 10, "perplexity": 2.0},
            "compressed": {"params": 8, "perplexity": 2.5, "bits_per_byte": 1.25},
        },
        "seconds": {"load": 1.0, "factorize": 2.0},
        "generation": {"prompt": "Hi", "dense": "there"},
    }
    lines = format_table(report).splitlines()
    assert lines[0].split() == ["dense", "compressed"]
    assert lines[2].split() == ["parameters", "10", "8"]
    assert lines[4].split() == ["bits", "per", "byte", "-", "1.2500"]
    assert "load 1.0 s, factorize 2.0 s" in lines and "dense: 'there'" in lines


def test_budget_by_choices_are_lowranks():
    from lowrank._budget import BUDGET_BY
    from recipes._compress_config import CompressFactorizeConfig

    hints = typing.get_type_hints(CompressFactorizeConfig)
    assert typing.get_args(hints["budget_by"]) == BUDGET_BY
