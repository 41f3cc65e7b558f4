"""The README's Python example runs as printed and reaches the accuracy the docs claim."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs dataset-fashion-mnist")
def test_python_example_runs():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    accuracy = float(out.getvalue().split("accuracy ")[1])
    assert accuracy > 0.84, out.getvalue()  # 1,000 training images, 1,000 test images


def test_every_test_the_promises_name_exists():
    """"What transferkit promises" links each promise to tests: each named test must exist."""
    named = set(re.findall(r"\b(test_\w+)`", README.read_text()))
    defined = set()
    for f in (README.parent / "tests").rglob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", f.read_text(), re.M))
    assert len(named) >= 10 and named <= defined, sorted(named - defined)


def test_every_import_the_docs_show_resolves():
    """The `from transferkit... import ...` lines of the README and docs/ name what exists (a moved function
    broke docs/finetune.md once)."""
    import importlib.util

    lines = set()
    for doc in [README, *sorted((README.parent / "docs").glob("*.md"))]:
        for block in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S):
            lines |= {(doc.name, m) for m in re.findall(r"^from (transferkit[\w.]*) import ([\w, ]+)$", block, re.M)}
    assert len(lines) >= 5
    for doc, (module, names) in sorted(lines):
        mod = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}"), f"{doc}: {module}.{name}"
