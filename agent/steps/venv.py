"""The venv devpi runs from: the system python3, the pinned devpi packages, bytecode compiled.

Root owns the venv, so the service user cannot change the code it runs (host/venv.py).
"""

from __future__ import annotations

from agent.core.context import Context
from agent.host.venv import builds_beside_earlier_steps, ensure_venv

NAME = "venv"


def can_start_early(ctx: Context) -> bool:
    """A first build that needs nothing apt installs runs while apt works (core/engine.py)."""
    return builds_beside_earlier_steps(ctx)


def converge(ctx: Context) -> None:
    ensure_venv(ctx)
