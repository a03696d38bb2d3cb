"""agent.core.reading: a named file's bytes and mode from one open, or the reason it cannot be
read, raised as the caller's own error."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.core.reading import FileRead, read_file


class Refused(Exception):
    pass


def refusal(path: Path, **kwargs: str) -> str:
    with pytest.raises(Refused) as info:
        read_file("the file", path, Refused, **kwargs)
    return str(info.value)


def test_bytes_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\x00data\n")
    path.chmod(0o640)
    assert read_file("the file", path, Refused) == FileRead(b"\x00data\n", 0o640)


def test_missing(tmp_path: Path) -> None:
    assert refusal(tmp_path / "nope") == f"the file {tmp_path}/nope does not exist"


def test_a_directory(tmp_path: Path) -> None:
    assert refusal(tmp_path) == f"the file {tmp_path} is a directory"


def test_below_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    assert refusal(tmp_path / "f" / "g") == (
        f"the file {tmp_path}/f/g cannot be read: Not a directory"
    )


def test_a_nul_in_the_path() -> None:
    assert refusal(Path("/tmp/a\x00b")).startswith("the file /tmp/a\x00b cannot be read: ")


def test_unreadable_with_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As root, mode 000 does not stop a read: simulate the EACCES."""
    path = tmp_path / "f"

    def denied(self: Path, *args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)
    assert (
        refusal(path, denied=" (run as root?)") == f"the file {path} is not readable (run as root?)"
    )
