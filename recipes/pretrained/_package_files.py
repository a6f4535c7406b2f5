"""Finding a data file inside an installed pip package, without importing the package."""

import importlib.util
import pathlib


def package_file(package: str, relative: str, *, install: str) -> pathlib.Path:
    """The path of `relative` inside the installed package `package`; a missing package
    or file is an error that says `install` (the pip command that fixes it). The
    package is located, not imported (some weight packages import torch)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package} is not installed; {install}")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing from the installed package {package}; reinstall it: "
            f"{install} --force-reinstall"
        )
    return path
