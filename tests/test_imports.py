"""The rooms' import directions: every module imports on its own, kernels never imports
lowrank or recipes, lowrank never imports recipes, and no two files import each other."""

import ast
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("kernels", "lowrank", "recipes")
FORBIDDEN = {"kernels": ("lowrank", "recipes"), "lowrank": ("recipes",)}


def _modules() -> dict[str, Path]:
    found = {}
    for room in ROOMS:
        for path in sorted((ROOT / room).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Modules of the rooms that `path` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in ROOMS}


MODULES = _modules()


@pytest.fixture
def unloaded_rooms():
    """The rooms' modules unloaded for one test, and the loaded ones back after it: other
    tests in the process hold them (monkeypatching a fresh copy would miss them)."""
    loaded = lambda: [m for m in sys.modules if m.split(".")[0] in ROOMS]
    saved = {m: sys.modules.pop(m) for m in loaded()}
    yield
    for m in loaded():
        del sys.modules[m]
    sys.modules.update(saved)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports_on_its_own(name, unloaded_rooms):
    importlib.import_module(name)


def test_rooms_import_only_downwards_and_no_two_files_import_each_other():
    graph = {name: _imports(name, path) & set(MODULES) for name, path in MODULES.items()}
    for name, targets in graph.items():
        for target in targets:
            assert not target.startswith(FORBIDDEN.get(name.split(".")[0], ())), (name, target)
    pairs = sorted(
        (a, b)
        for a, targets in graph.items()
        for b in targets
        if a < b and a in graph.get(b, set()) and not a.endswith(b) and not b.endswith(a)
    )
    pairs = [
        (a, b) for a, b in pairs if not (a == b.rpartition(".")[0] or b == a.rpartition(".")[0])
    ]
    assert not pairs, f"files importing each other: {pairs}"


def _private_recipes_imports(source: str) -> list[str]:
    """The private names of recipes that `source` imports: a module path with a `_x`
    part (`recipes._x`, `recipes.models._x`) or a `_y` taken from a recipes module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            modules = [(node.module or "", [a.name for a in node.names])]
        else:
            continue
        for module, names in modules:
            if module.split(".")[0] != "recipes":
                continue
            found += [module] if any(p.startswith("_") for p in module.split(".")) else []
            found += [f"{module}.{n}" for n in names if n.startswith("_")]
    return found


def test_the_private_import_check_sees_both_forms():
    source = (
        "import recipes.run\nfrom recipes import models\nimport lowrank._plan\n"
        "from recipes._report import seconds_in_turns\nimport recipes.models._resnet\n"
        "def f():\n    from recipes.policy import _hidden\n"
    )
    assert _private_recipes_imports(source) == [
        "recipes._report",
        "recipes.models._resnet",
        "recipes.policy._hidden",
    ]


PUBLIC_ONLY = sorted(
    p
    for p in [*(ROOT / "recipes" / "configs").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]
    if "reference" not in p.relative_to(ROOT).parts
)


@pytest.mark.parametrize("path", PUBLIC_ONLY, ids=lambda p: str(p.relative_to(ROOT)))
def test_configs_and_benches_import_only_public_names_of_recipes(path):
    private = _private_recipes_imports(path.read_text())
    assert not private, (
        f"{path.relative_to(ROOT)} imports private names of recipes: {private}; "
        "import them from a public recipes module (re-export them there if needed)."
    )
