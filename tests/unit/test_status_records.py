"""core/status.py: a record is replaced whole, stamped, and an unreadable one reads as none."""

from __future__ import annotations

import stat
from pathlib import Path

from agent.core.files import Files
from agent.core.paths import STATUS_DIR
from agent.core.status import read_status, status_path, write_status


def test_record_round_trip_and_mode(tmp_path: Path) -> None:
    files = Files(root=tmp_path)
    written = write_status(files, "backup", ok=True, files=3)
    assert read_status(files, "backup") == written
    assert written["ok"] is True and written["finished"] > 0
    path = files.host_path(status_path("backup"))
    assert path.parent == files.host_path(STATUS_DIR)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    write_status(files, "backup", ok=False, error="disk full")
    assert read_status(files, "backup") == {
        "ok": False,
        "error": "disk full",
        "finished": read_status(files, "backup")["finished"],  # type: ignore[index]
    }
    assert not list(path.parent.glob(".*.tmp"))


def test_missing_or_garbled_record_is_none(tmp_path: Path) -> None:
    files = Files(root=tmp_path)
    assert read_status(files, "backup") is None
    path = files.host_path(status_path("backup"))
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert read_status(files, "backup") is None
    path.write_text("[1, 2]")
    assert read_status(files, "backup") is None
