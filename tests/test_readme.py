"""The README's API, "Write your own initializer" and "Add a recipe" examples run as
written (on their own small shapes), and the API section names every exported name."""

import ast
import re
from pathlib import Path

import pytest

import kernels
import lowrank

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = ("API", "Write your own initializer", "Add a recipe")


def _section(title: str) -> str:
    """The text of the README's `## title` section, up to the next `## ` heading."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def _python_blocks(title: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", _section(title), re.M | re.S)


def _exported(module) -> list[str]:
    """The names a package's __init__ re-exports (`from ._x import y as y`)."""
    tree = ast.parse(Path(module.__file__).read_text())
    imports = [node for node in tree.body if isinstance(node, ast.ImportFrom)]
    return sorted({a.name for node in imports for a in node.names if a.asname == a.name})


@pytest.mark.parametrize("title", SECTIONS)
def test_readme_examples_run(title, tmp_path, monkeypatch):
    blocks = _python_blocks(title)
    assert blocks, f"the README's {title!r} section has no python example"
    monkeypatch.chdir(tmp_path)  # the recipe example writes out/<name>/
    for block in blocks:
        exec(compile(block, f"README.md ({title})", "exec"), {"__name__": "readme"})
    if title == "Add a recipe":
        written = sorted(p.name for p in (tmp_path / "out" / "regression").iterdir())
        assert {"config.json", "metrics.jsonl"} <= set(written), written


@pytest.mark.parametrize("module", [lowrank, kernels], ids=lambda m: m.__name__)
def test_api_section_names_every_export(module):
    names = _exported(module)
    assert len(names) >= (20 if module is lowrank else 3), names
    api = _section("API")
    missing = [n for n in names if f"`{n}" not in api]
    assert not missing, f"README.md's API section does not document {missing}"
