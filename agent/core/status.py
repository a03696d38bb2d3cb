"""The agent's status records: one small JSON document per kind of run (``backup.json``, and
whatever else records its last result), under STATUS_DIR, for the metrics exporter, `verify` and
monitoring checks to read. They never hold a secret (mode 0644).

A record is replaced whole (atomic write): a reader sees the previous record or the new one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from agent.core.files import Files, atomic_write
from agent.core.paths import STATUS_DIR


def status_path(name: str) -> Path:
    return STATUS_DIR / f"{name}.json"


def write_status(files: Files, name: str, /, **fields: Any) -> dict[str, Any]:
    """Record `fields` as the last result of `name`, stamped with the time it finished."""
    record = {"finished": round(time.time(), 3), **fields}
    data = (json.dumps(record, sort_keys=True) + "\n").encode()
    directory = files.host_path(STATUS_DIR)
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    atomic_write(files.host_path(status_path(name)), data, mode=0o644, owner=None)
    return record


def read_status(files: Files, name: str) -> dict[str, Any] | None:
    """The last record of `name`, or None if there is none or it cannot be read as one."""
    try:
        record = json.loads(files.host_path(status_path(name)).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
