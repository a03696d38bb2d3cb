"""What kind of host this is, as the agent passes it around (facts/system.py reads it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OsRelease:
    id: str
    version_id: str
    codename: str

    @property
    def pretty(self) -> str:
        return f"{self.id} {self.version_id} ({self.codename})"
