"""The house rules that keep transferkit easy to change (docs/architecture.md): layers import downward only,
every public name resolves, modules stay small."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import transferkit

PACKAGE = Path(transferkit.__file__).parent
# the floors, lowest first: a module may import its own room and the floors below, never sideways or up
LAYERS = [("errors",), ("runtime", "plots"), ("data",), ("models",), ("codes",), ("probe",), ("finetune",),
          ("surgery",), ("jobs",), ("auditing",), ("recipes",), ("cli",), ("__main__",)]
FLOOR = {room: level for level, rooms in enumerate(LAYERS) for room in rooms}


def room(module: str) -> str:
    """'transferkit.codes.store' -> 'codes'."""
    return module.split(".")[1]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every transferkit import in a file, at any depth (lazy imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transferkit"):
            if node.module == "transferkit":  # `from transferkit import codes` or `__version__`
                found += [(node.lineno, f"transferkit.{a.name}") for a in node.names if a.name != "__version__"]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("transferkit.")]
    return found


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_module_lives_in_a_room_with_a_floor():
    rooms = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in modules()}
    assert rooms <= set(FLOOR), sorted(rooms - set(FLOOR))


def test_layers_import_downward_only():
    wrong = []
    for path in modules():
        mine = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for line, module in imports(path):
            other = room(module)
            if other != mine and FLOOR[other] >= FLOOR[mine]:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_every_public_name_imports():
    for name in transferkit.__all__:
        assert getattr(transferkit, name) is not None, name
    from transferkit import extract  # the name the README and the issue tracker used

    assert callable(extract)


def test_every_room_says_what_lives_there():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"{init.relative_to(PACKAGE)}: say what lives here and what it may import"


@pytest.mark.parametrize("path", [p for p in modules() if p.name != "__main__.py"],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_import_on_their_own(path):
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    importlib.import_module(".".join(("transferkit", *(parts[:-1] if parts[-1] == "__init__" else parts))))


def test_functions_stay_short():
    """nanoGPT's budget: functions of ~10-40 lines, none over 60 (split it, or say why in a comment above it)."""
    long = []
    for path in modules():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            too_long = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60
            if too_long and not lines[node.lineno - 2].lstrip().startswith("#"):  # a comment above says why
                long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not long, long
