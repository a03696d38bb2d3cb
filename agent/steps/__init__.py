"""The steps of `apply`, in order: each one converges one thing on the host."""

from __future__ import annotations

from agent.core.context import Context, Step, StepFailed
from agent.steps import (
    apt,
    backup,
    caddy,
    devpi_config,
    devpi_init,
    devpi_users,
    metrics,
    service_user,
    supervisor,
    tls,
    upgrade,
    venv,
)

# The one list of steps, in the order apply runs them (the contract: core/context.py's Step).
STEPS: tuple[Step, ...] = tuple(
    Step.of(module)
    for module in (
        apt,
        # Right after apt (it makes the caddy group): a TLS problem stops the run before
        # devpi or Caddy are changed, so the old configuration keeps serving as it was.
        tls,
        service_user,
        upgrade,
        venv,
        devpi_config,
        devpi_init,
        supervisor,
        devpi_users,
        caddy,
        backup,
        metrics,
    )
)

__all__ = ["STEPS", "Context", "Step", "StepFailed"]
