"""The offline photographs and their crops for ImageNet models."""

import numpy as np
import pytest

from recipes.data import PHOTOS, photo, photo_crops, photo_split
from recipes.data._photos import _COLOR, _GRAY


def test_photos_are_rgb_photographs_large_enough_to_crop():
    assert len(PHOTOS) == len(set(PHOTOS)) == 20
    for name in PHOTOS:
        image = photo(name)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
        assert min(image.shape[:2]) >= 172, name
        assert image.std() > 10, name  # not a flat or synthetic-looking image
    assert not photo("chelsea").flags.writeable  # the cached copy cannot be changed
    with pytest.raises(
        ValueError, match=r"photo 'colorwheel' is not one of the offline photographs"
    ):
        photo("colorwheel")


@pytest.mark.parametrize("seed", range(4))
def test_photo_split_is_disjoint_covering_and_mixed(seed):
    split = photo_split(seed=seed)
    assert not set(split.calibration) & set(split.evaluation)
    assert sorted(split.calibration + split.evaluation) == sorted(PHOTOS)
    for side in (split.calibration, split.evaluation):
        assert set(side) & set(_COLOR) and set(side) & set(_GRAY)
    assert photo_split(seed=seed) == split  # deterministic


def test_photo_split_follows_the_seed_and_fraction():
    assert len({photo_split(seed=s).evaluation for s in range(4)}) > 1
    split = photo_split(evaluation_fraction=0.3)
    assert len(split.evaluation) == 6 and len(split.calibration) == 14
    with pytest.raises(
        ValueError,
        match=r"evaluation_fraction=1.0: use a share strictly between 0 and 1",
    ):
        photo_split(evaluation_fraction=1.0)


def test_photo_crops_are_deterministic_normalized_and_cycle_through_photos():
    names = ("chelsea", "coffee", "moon")
    unit = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    crops = photo_crops(names, 6, normalization=unit, size=32, seed=3)
    assert crops.shape == (6, 3, 32, 32) and crops.dtype == np.float32
    assert crops.min() >= 0.0 and crops.max() <= 1.0
    # "moon" is grayscale: crops 2 and 5 have three equal channels, the color ones do not.
    np.testing.assert_allclose(crops[2, 0], crops[2, 1], atol=1e-6)
    assert np.abs(crops[0, 0] - crops[0, 2]).max() > 0.1
    np.testing.assert_allclose(
        photo_crops(names, 6, normalization=unit, size=32, seed=3), crops, rtol=1e-6
    )
    assert np.abs(photo_crops(names, 6, normalization=unit, size=32, seed=4) - crops).max() > 0.1
    shifted = photo_crops(names, 6, normalization=((0.5,) * 3, (0.25,) * 3), size=32, seed=3)
    np.testing.assert_allclose(shifted, (crops - 0.5) / 0.25, rtol=1e-5, atol=1e-5)


def test_photo_crops_reject_empty_requests():
    unit = ((0.0,) * 3, (1.0,) * 3)
    with pytest.raises(ValueError, match=r"names is empty: pass the photographs to crop"):
        photo_crops((), 4, normalization=unit)
    with pytest.raises(ValueError, match=r"count=0: ask for at least one crop"):
        photo_crops(("chelsea",), 0, normalization=unit)
