"""The steps of `apply`, in order: each one converges one thing on the host."""

from __future__ import annotations

from agent.steps import (
    apt,
    caddy,
    devpi_config,
    devpi_init,
    devpi_users,
    service_user,
    supervisor,
    venv,
)
from agent.steps.base import Context, Step, StepFailed

STEPS: tuple[Step, ...] = tuple(
    Step(module.NAME, module.converge, (module.__doc__ or "").strip().splitlines()[0])
    for module in (
        apt,
        service_user,
        venv,
        devpi_config,
        devpi_init,
        supervisor,
        devpi_users,
        caddy,
    )
)

__all__ = ["STEPS", "Context", "Step", "StepFailed"]
