"""Prepared TFDS datasets read through `tfds.data_source` (array_record; no TensorFlow)."""

from collections.abc import Sequence
from typing import Any

from ..config import ConfigError


def tfds_source(name: str, split: str, *, data_dir: str | None) -> Sequence[dict[str, Any]]:
    """A random-access source over a TFDS dataset prepared under `data_dir`.

    Never downloads: training machines may have no network. A dataset that is not
    prepared raises an error that says how to prepare it.

    Args:
        name: the TFDS dataset name.
        split: the split ("train", "test", "train[:90%]", ...).
        data_dir: where it is prepared (None: TFDS's default, ~/tensorflow_datasets).

    Returns:
        The `tfds.data_source` (array_record) of the split.

    Raises:
        ConfigError: `name` is not a TFDS dataset.
        FileNotFoundError: the dataset is not prepared (or not as array_record),
            with the `tfds build` command that fixes it.
    """
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.DatasetNotFoundError as e:
        raise ConfigError(
            f"data.name={name!r} is not a TFDS dataset; use 'digits' or a TFDS name "
            "such as 'cifar10' or 'imagenet2012'."
        ) from e
    except Exception as e:
        root = data_dir or "~/tensorflow_datasets"
        if tfds.builder(name, data_dir=data_dir).is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {name!r} (split {split!r}) under data_dir={data_dir!r} cannot "
                f"be opened: {e}\nIf it was built as tfrecord, rebuild it with `tfds build "
                f"{name} --data_dir={root} --file_format=array_record`."
            ) from e
        manual = (
            f" (imagenet2012 also needs the ILSVRC2012 tar files in {root}/downloads/manual)"
            if name.startswith("imagenet")
            else ""
        )
        raise FileNotFoundError(
            f"TFDS dataset {name!r} (split {split!r}) is not prepared under "
            f"data_dir={data_dir!r}. Prepare it on a machine with network: `tfds build {name} "
            f"--data_dir={root} --file_format=array_record`{manual}, then copy the folder "
            "here and set data.data_dir."
        ) from e
