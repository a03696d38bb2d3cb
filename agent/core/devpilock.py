"""devpi's lock: every package of devpi's venv, pinned with its sha256 hashes.

The agent ships one (units/devpi.lock, made by `make lock-devpi` from devpi-requirements.in); a
user may name their own (devpi.lock_file). Both are pip requirements files as `uv pip compile
--generate-hashes` writes them: one `name==version [; marker]` per requirement, each followed by
its `--hash=sha256:...` options on backslash-continued lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.core.resources import units_dir

SHIPPED_LOCK = "devpi.lock"
# Packages that publish only an sdist: built on the host from their hashed sdist, without build
# isolation (with the locked setuptools), after every wheel is in.
SDIST_ONLY = frozenset({"pyramid-chameleon"})

_PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)"
    r"\s*(?:;\s*(?P<marker>[^\\]+?))?\s*$"
)
_HASH = re.compile(r"^--hash=sha256:[0-9a-f]{64}$")


class LockError(ValueError):
    """A lock that is not name==version lines each with sha256 hashes; says which line."""


@dataclass(frozen=True)
class Pin:
    name: str  # normalised (PEP 503)
    version: str
    marker: str | None
    hashes: tuple[str, ...]
    text: str  # the requirement with its hashes, as pip reads it

    @property
    def sdist_only(self) -> bool:
        return self.name in SDIST_ONLY


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _logical_lines(text: str) -> list[tuple[int, str]]:
    lines: list[tuple[int, str]] = []
    current, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0] if not raw.lstrip().startswith("#") else ""
        if not current:
            start = number
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            lines.append((start, current.strip()))
        current = ""
    if current.strip():
        lines.append((start, current.strip()))
    return lines


def parse_lock(text: str) -> tuple[Pin, ...]:
    """The pins of a lock; LockError naming the line of anything else."""
    pins: list[Pin] = []
    for number, line in _logical_lines(text):
        words = line.split()
        options = [w for w in words if w.startswith("--")]
        requirement = " ".join(w for w in words if not w.startswith("--"))
        match = _PIN.match(requirement)
        if match is None:
            raise LockError(f"line {number}: {requirement or line!r} is not name==version")
        bad = [o for o in options if not _HASH.match(o)]
        if bad:
            raise LockError(f"line {number}: {bad[0]!r} is not a --hash=sha256:<64 hex digits>")
        if not options:
            raise LockError(
                f"line {number}: {match['name']}=={match['version']} has no sha256 hash"
            )
        hashes = tuple(o.split(":", 1)[1] for o in options)
        pins.append(
            Pin(
                name=normalise(match["name"]),
                version=match["version"],
                marker=match["marker"],
                hashes=hashes,
                text=" \\\n    ".join([requirement, *options]),
            )
        )
    if not pins:
        raise LockError("holds no requirement")
    return tuple(pins)


def versions_of(pins: tuple[Pin, ...], name: str) -> set[str]:
    return {pin.version for pin in pins if pin.name == normalise(name)}


def shipped_lock() -> str:
    """The lock inside the agent (units/devpi.lock)."""
    return (units_dir() / SHIPPED_LOCK).read_text()
