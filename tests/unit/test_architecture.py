"""The layout keeps its promises (docs/architecture.md): every module imports on its own, in a
fresh interpreter, whatever was imported before; the layers hold (import-linter, `make lint`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = sorted(
    ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    for path in (REPO / "agent").rglob("*.py")
    # __main__ runs the command line when imported.
    if path.name != "__main__.py"
)


# Top to bottom; each may import only the ones below it (pyproject.toml's import-linter contract).
LAYERS = ("commands", "steps", "host", "facts", "core")


def test_every_module_is_in_a_layer() -> None:
    outside = [m for m in MODULES if m != "agent" and m.split(".")[1] not in LAYERS]
    assert outside == []


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports_alone(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
