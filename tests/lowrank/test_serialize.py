"""save/load: file names, atomic writes, and corrupted, edited or mismatched files."""

import json
import os

import equinox as eqx
import jax
import numpy as np
import pytest

import lowrank

from ._models import CNN, mlp

KEY = jax.random.key(0)


@pytest.fixture
def saved(tmp_path):
    """A factorized MLP saved as tmp_path/model (no suffix), and a fresh dense twin."""
    low, plan = lowrank.factorize(mlp(key=KEY), rank=3, return_plan=True)
    lowrank.save(tmp_path / "model", low, plan)
    return tmp_path, low, mlp(key=jax.random.key(7))


def _same(a, b):
    x = jax.random.normal(KEY, (20,))
    np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))


def test_save_and_load_round_trip(tmp_path):
    model = CNN(key=KEY)
    low, plan = lowrank.factorize(model, rank=lowrank.Budget(params=0.5), return_plan=True)
    lowrank.save(tmp_path / "model.eqx", low, plan)
    fresh_dense = CNN(key=jax.random.key(7))  # same constructor, other weights
    loaded = lowrank.load(tmp_path / "model.eqx", fresh_dense)
    x = jax.random.normal(KEY, (3, 9, 9))
    np.testing.assert_array_equal(loaded(x), low(x))
    with pytest.raises(FileNotFoundError, match="written by lowrank.save"):
        lowrank.load(tmp_path / "missing.eqx", fresh_dense)
    with pytest.raises(TypeError, match="save needs the Plan"):
        lowrank.save(tmp_path / "x.eqx", low, None)
    other_plan = lowrank.plan(model, rank=1)
    with pytest.raises(ValueError, match="the plan does not describe this model"):
        lowrank.save(tmp_path / "x.eqx", low, other_plan)


def test_save_and_load_agree_on_names_with_or_without_suffix(saved):
    tmp_path, low, dense = saved
    assert sorted(os.listdir(tmp_path)) == ["model.eqx", "model.plan.json"]
    _same(lowrank.load(tmp_path / "model", dense), low)
    _same(lowrank.load(str(tmp_path / "model.eqx"), dense), low)
    lowrank.save(
        tmp_path / "sub" / "v2.final",
        low,
        lowrank.factorize(mlp(key=KEY), rank=3, return_plan=True)[1],
    )
    assert sorted(os.listdir(tmp_path / "sub")) == ["v2.final.eqx", "v2.final.plan.json"]
    _same(lowrank.load(tmp_path / "sub" / "v2.final", dense), low)


def test_save_onto_a_directory_is_refused(saved):
    tmp_path, low, _ = saved
    (tmp_path / "out").mkdir()
    plan = lowrank.factorize(mlp(key=KEY), rank=3, return_plan=True)[1]
    with pytest.raises(
        IsADirectoryError,
        match=r"path '.*out' is a directory; give a file name inside it, e.g. '.*out/model'",
    ):
        lowrank.save(tmp_path / "out", low, plan)
    assert os.listdir(tmp_path / "out") == []


def test_a_save_that_fails_midway_leaves_the_previous_save_intact(saved, monkeypatch):
    tmp_path, low, dense = saved
    other, plan = lowrank.factorize(mlp(key=jax.random.key(3)), rank=2, return_plan=True)
    real = eqx.tree_serialise_leaves

    def disk_full(f, model):
        real(f, model)  # the leaves reach the file, then the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(eqx, "tree_serialise_leaves", disk_full)
    with pytest.raises(OSError, match="No space left"):
        lowrank.save(tmp_path / "model", other, plan)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["model.eqx", "model.plan.json"]  # no temp files left
    _same(lowrank.load(tmp_path / "model", dense), low)


def test_a_save_interrupted_between_the_two_files_is_detected(saved, monkeypatch):
    tmp_path, _, dense = saved
    other, plan = lowrank.factorize(mlp(key=jax.random.key(3)), rank=3, return_plan=True)
    real, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        lowrank.save(tmp_path / "model", other, plan)
    monkeypatch.undo()
    assert [os.path.basename(c) for c in calls] == ["model.eqx", "model.plan.json"]
    with pytest.raises(
        ValueError,
        match=r"model.eqx does not match .*model.plan.json: .*from another save .*Save the model again",
    ):
        lowrank.load(tmp_path / "model", dense)


@pytest.mark.parametrize(
    "damage,match",
    [
        (
            lambda b: b[: len(b) // 2],
            r"has \d+ bytes where the save wrote \d+ \(shorter \(truncated\?\)",
        ),
        (lambda b: b + b"garbage", r"\(longer; SHA-256 differs\)"),
        (
            lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:],
            r"\(changed; SHA-256 differs\), so it is corrupted, edited",
        ),
    ],
)
def test_damaged_weights_files_are_detected(saved, damage, match):
    tmp_path, _, dense = saved
    weights = tmp_path / "model.eqx"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ValueError, match=match):
        lowrank.load(tmp_path / "model", dense)


def test_damaged_or_foreign_plan_files_name_the_file_and_the_fix(saved):
    tmp_path, _, dense = saved
    plan_file = tmp_path / "model.plan.json"
    text = plan_file.read_text()
    plan_file.write_text(text[:100])
    with pytest.raises(
        ValueError,
        match=r"model.plan.json is not a lowrank.save plan file: it is not valid JSON .*save the model again with lowrank.save",
    ):
        lowrank.load(tmp_path / "model", dense)
    plan_file.write_text(lowrank.plan(mlp(key=KEY), rank=3).to_json())  # a bare plan
    with pytest.raises(
        ValueError,
        match=r"is not a lowrank.save plan file \(format 1, keys \['leaves', 'lowrank_save', 'plan', 'weights'\]; got \['budget'",
    ):
        lowrank.load(tmp_path / "model", dense)
    record = json.loads(text)
    record["plan"]["layers"][1]["rank"] = "3"
    plan_file.write_text(json.dumps(record))
    with pytest.raises(
        ValueError,
        match=r"model.plan.json holds a broken plan: plan layer 1 \('layers.1'\) field 'rank' must be int or null",
    ):
        lowrank.load(tmp_path / "model", dense)


def test_an_edited_rank_is_caught_by_the_leaf_manifest(saved):
    tmp_path, _, dense = saved
    plan_file = tmp_path / "model.plan.json"
    record = json.loads(plan_file.read_text())
    record["plan"]["layers"][1]["rank"] = 2
    plan_file.write_text(json.dumps(record))
    with pytest.raises(
        ValueError,
        match=r"layers.1.u is float32\[32,3\] in the file but float32\[32,2\] in the model.*if the plan file was edited, restore it",
    ):
        lowrank.load(tmp_path / "model", dense)


@pytest.mark.parametrize(
    "dense,match",
    [
        (
            lambda: eqx.nn.MLP(20, 7, 32, 2, use_bias=False, key=KEY),
            r"layers.0.bias is in the file but not in the model",
        ),
        (
            lambda: eqx.nn.MLP(20, 7, 32, 2, dtype="bfloat16", key=KEY),
            r"layers.0.u is float32\[32,3\] in the file but bfloat16\[32,3\] in the model",
        ),
        (
            lambda: eqx.nn.MLP(24, 7, 32, 2, key=KEY),
            r"the plan in .*model.plan.json does not fit dense_model: plan layer layers.0 has shape \(32, 20\)",
        ),
        (
            lambda: eqx.nn.MLP(20, 7, 16, 2, key=KEY),
            r"does not fit dense_model: .*layers.0 has shape \(32, 20\) but the model's weight is \(16, 20\)",
        ),
    ],
)
def test_a_dense_model_that_does_not_fit_is_named_with_the_fix(saved, dense, match):
    tmp_path, _, _ = saved
    with pytest.raises(ValueError, match=match + r".*[Bb]uild dense_model with the constructor"):
        lowrank.load(tmp_path / "model", dense())
