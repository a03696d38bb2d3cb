"""What systemd says of a unit: active, enabled, and its properties (read-only)."""

from __future__ import annotations

from dataclasses import dataclass

from agent.core.runner import Runner


@dataclass(frozen=True)
class UnitState:
    active: str  # "active", "inactive", "failed", ...
    enabled: str  # "enabled", "disabled", "masked", "static", ...

    @property
    def running_and_enabled(self) -> bool:
        return self.active == "active" and self.enabled == "enabled"


def is_active(runner: Runner, unit: str) -> str:
    return runner.run(["systemctl", "is-active", unit], check=False).stdout.strip() or "unknown"


def unit_state(runner: Runner, unit: str) -> UnitState:
    """ActiveState and UnitFileState, what `is-active` and `is-enabled` print, in one call."""
    found = unit_properties(runner, unit, "ActiveState", "UnitFileState")
    return UnitState(found.get("ActiveState") or "unknown", found.get("UnitFileState") or "unknown")


def unit_properties(runner: Runner, unit: str, *names: str) -> dict[str, str]:
    """`systemctl show` of these properties; missing ones are absent from the result."""
    result = runner.run(["systemctl", "show", unit, f"--property={','.join(names)}"], check=False)
    found: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            found[key] = value
    return found
