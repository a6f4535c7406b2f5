import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from recipes.data import (
    DIGITS_TEST_SIZE,
    ArraySource,
    digits,
    eval_batches,
    image_dataset,
    normalize,
    pad_crop,
    random_flip,
    random_resized_crop,
    resize_center_crop,
    tfds_source,
    train_batches,
)


def test_digits_split_covers_every_image_once():
    train, test = digits()
    reference = load_digits()
    assert len(test) == DIGITS_TEST_SIZE and len(train) + len(test) == len(reference.images)
    ours = np.concatenate([train.images, test.images])[..., 0].astype(np.float64)
    expected = np.round(reference.images * 255 / 16)
    # Same multiset of (image, label) pairs: compare after sorting by content.
    order = lambda imgs, labels: sorted(zip(map(bytes, imgs.astype(np.uint8)), labels.tolist()))
    assert order(ours, np.concatenate([train.labels, test.labels])) == order(
        expected, reference.target
    )


def test_digits_upscaled_to_three_channels():
    train, _ = digits(image_size=32, channels=3)
    image = train[0]["image"]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    with pytest.raises(ValueError, match="image_size=4 is below the digits' native 8x8"):
        digits(image_size=4)
    with pytest.raises(ValueError, match="channels=2: digits are grayscale, use 1 or 3"):
        digits(channels=2)


def test_array_source_needs_one_label_per_image():
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        ArraySource(np.zeros((3, 2, 2, 1), np.uint8), np.zeros(2))


def test_pad_crop_is_a_window_of_the_padded_image():
    image = np.arange(5 * 6 * 2, dtype=np.uint8).reshape(5, 6, 2)
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
    rng = np.random.default_rng(0)
    offsets = set()
    for _ in range(200):
        out = pad_crop(image, rng, 2)
        matches = [
            (t, l)
            for t in range(5)
            for l in range(5)
            if np.array_equal(out, padded[t : t + 5, l : l + 6])
        ]
        assert matches
        offsets.update(matches)
    assert len(offsets) == 25  # every translation is reachable


def test_random_flip_mirrors_half_the_time():
    image = np.arange(12, dtype=np.uint8).reshape(2, 6, 1)
    rng = np.random.default_rng(0)
    flips = [np.array_equal(random_flip(image, rng), image[:, ::-1]) for _ in range(400)]
    assert 0.4 < np.mean(flips) < 0.6


def test_random_resized_crop_shapes_and_full_view():
    rng = np.random.default_rng(0)
    image = np.full((40, 60, 3), 77, np.uint8)
    out = random_resized_crop(image, rng, 24)
    assert out.shape == (24, 24, 3) and np.all(out == 77)
    square = np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        random_resized_crop(square, rng, 16, scale=(1, 1), ratio=(1, 1)), square
    )


def test_resize_center_crop_keeps_the_center():
    image = np.zeros((100, 200, 3), np.uint8)
    image[10:90, 60:140] = 200  # an 80x80 square in the middle
    out = resize_center_crop(image, 64)  # shorter side -> 73, then the central 64x64
    assert out.shape == (64, 64, 3)
    assert np.all(out[32, 32] == 200) and np.all(out[0, 0] == 0) and np.all(out[-1, -1] == 0)


def test_normalize_standardizes_channels_first():
    image = np.array([[[0, 255]]], np.uint8)  # 1x1 pixel, 2 channels
    out = normalize(image, mean=(0.5, 0.5), std=(0.25, 0.5))
    np.testing.assert_allclose(out[:, 0, 0], [(0 - 0.5) / 0.25, (1 - 0.5) / 0.5])
    assert out.shape == (2, 1, 1) and out.dtype == np.float32


@pytest.fixture(scope="module")
def small_digits():
    return image_dataset("digits", image_size=8)


def test_train_batches_resume_at_any_step(small_digits):
    batches = train_batches(small_digits, batch_size=16, image_size=8, augment="crop", seed=3)
    stream = batches(0)
    first = [next(stream) for _ in range(4)]
    assert first[0]["image"].shape == (16, 3, 8, 8) and first[0]["image"].dtype == np.float32
    assert first[0]["label"].dtype == np.int32
    resumed = next(batches(3))
    np.testing.assert_array_equal(resumed["image"], first[3]["image"])
    np.testing.assert_array_equal(resumed["label"], first[3]["label"])
    other_seed = next(
        train_batches(small_digits, batch_size=16, image_size=8, augment="crop", seed=4)(0)
    )
    assert not np.array_equal(other_seed["label"], first[0]["label"])


def test_train_batches_visit_every_example_once_per_epoch(small_digits):
    n = len(small_digits.train)
    batches = train_batches(small_digits, batch_size=20, image_size=8, augment="none", seed=0)(0)
    reference = {
        bytes(normalize(small_digits.train[i]["image"], small_digits.mean, small_digits.std))
        for i in range(n)
    }
    seen = [bytes(image) for _ in range(n // 20) for image in next(batches)["image"]]
    assert len(seen) == n and set(seen) <= reference and len(set(seen)) == len(reference)


def test_processes_read_disjoint_shares_of_the_global_batch(small_digits, monkeypatch):
    single = next(
        train_batches(small_digits, batch_size=8, image_size=8, augment="crop", seed=0)(2)
    )
    shares = []
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        shares.append(
            next(train_batches(small_digits, batch_size=8, image_size=8, augment="crop", seed=0)(2))
        )
    np.testing.assert_array_equal(np.concatenate([s["image"] for s in shares]), single["image"])
    with pytest.raises(ValueError, match="data.batch_size=7 is not divisible by the 2 processes"):
        train_batches(small_digits, batch_size=7, image_size=8, augment="none", seed=0)


def test_eval_batches_pad_and_mask_the_last_batch(small_digits):
    n = len(small_digits.eval)
    batches = list(eval_batches(small_digits, batch_size=128, image_size=8, augment="none")())
    assert len(batches) == -(-n // 128) and all(b["image"].shape == (128, 3, 8, 8) for b in batches)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == n and np.all(mask[:n] == 1)
    labels = np.concatenate([b["label"] for b in batches])[:n]
    np.testing.assert_array_equal(labels, small_digits.eval.labels)


def test_tfds_cifar10_through_the_pipeline(tmp_path):
    with tfds.testing.mock_data(num_examples=12):
        data = image_dataset("cifar10", image_size=32, data_dir=str(tmp_path))
        batch = next(
            train_batches(data, batch_size=4, image_size=32, augment="crop_flip", seed=0)(0)
        )
    assert data.num_classes == 10 and data.mean == (0.4914, 0.4822, 0.4465)
    assert batch["image"].shape == (4, 3, 32, 32) and np.all(
        (0 <= batch["label"]) & (batch["label"] < 10)
    )


def test_tfds_imagenet_inception_crops(tmp_path):
    with tfds.testing.mock_data(num_examples=6):
        data = image_dataset(
            "imagenet2012", image_size=24, data_dir=str(tmp_path), eval_split="validation"
        )
        train = next(
            train_batches(data, batch_size=2, image_size=24, augment="inception", seed=0)(0)
        )
        (evaluated, *_) = eval_batches(data, batch_size=4, image_size=24, augment="inception")()
    assert data.num_classes == 1000
    assert train["image"].shape == (2, 3, 24, 24) and evaluated["image"].shape == (4, 3, 24, 24)


def test_missing_tfds_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"`tfds build cifar10 --data_dir=.* --file_format=array_record`"
    ):
        tfds_source("cifar10", "train", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ILSVRC2012 tar files in .*downloads/manual"):
        tfds_source("imagenet2012", "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="data.name='no_such_dataset' is not a TFDS dataset"):
        tfds_source("no_such_dataset", "train", data_dir=str(tmp_path))


def test_prepared_but_unreadable_tfds_dataset_shows_the_cause(tmp_path, monkeypatch):
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with pytest.raises(
        FileNotFoundError,
        match=r"'cifar10' \(split 'train'\) under .* cannot be opened: (.|\n)*If it was built as tfrecord",
    ):
        tfds_source("cifar10", "train", data_dir=str(tmp_path))
