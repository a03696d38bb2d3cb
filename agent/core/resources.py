"""Locate files shipped beside the agent package.

The Jinja2 templates live in a top-level ``units/`` directory next to the
``agent`` package, both in a source checkout (``<repo>/agent``,
``<repo>/units``) and inside the pex built by ``make dist``, which packs
``agent/`` and ``units/`` as sibling top-level directories; in ``--venv``
mode both land in the venv's ``site-packages``.
"""

from __future__ import annotations

from pathlib import Path

import agent


def units_dir() -> Path:
    """Return the directory holding the Jinja2 templates of every file the agent writes."""
    path = Path(agent.__file__).resolve().parent.parent / "units"
    if not path.is_dir():
        raise FileNotFoundError(f"templates directory not found: {path}")
    return path
