"""agent.core.files.Files under a temporary root: idempotent, atomic, diffs recorded, plan inert."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.core.files import Files, atomic_write, render

CONF = Path("/etc/devpi-agent/test.conf")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(root=tmp_path, chown=False)


def test_host_path_is_under_root(tmp_path: Path, files: Files) -> None:
    assert files.host_path(CONF) == tmp_path / "etc/devpi-agent/test.conf"


def test_ensure_file_creates_with_mode(tmp_path: Path, files: Files) -> None:
    assert files.ensure_file(CONF, "a = 1\n", mode=0o640) is True
    real = tmp_path / "etc/devpi-agent/test.conf"
    assert real.read_text() == "a = 1\n"
    assert mode_of(real) == 0o640
    assert [c.path for c in files.changes] == [CONF]
    diff = files.changes[0].diff
    assert diff.startswith("--- /dev/null\n+++ /etc/devpi-agent/test.conf\n")
    assert "+a = 1\n" in diff


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o755, 0o640])
def test_ensure_file_mode_ignores_umask(tmp_path: Path, files: Files, mode: int) -> None:
    old = os.umask(0o077)
    try:
        files.ensure_file(CONF, "x\n", mode=mode)
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "etc/devpi-agent/test.conf") == mode


def test_ensure_file_is_idempotent(files: Files) -> None:
    assert files.ensure_file(CONF, "a = 1\n", mode=0o644) is True
    assert files.ensure_file(CONF, "a = 1\n", mode=0o644) is False
    assert files.ensure_file(CONF, b"a = 1\n", mode=0o644) is False
    assert len(files.changes) == 1


def test_ensure_file_content_change_records_unified_diff(tmp_path: Path, files: Files) -> None:
    files.ensure_file(CONF, "a = 1\nb = 2\n", mode=0o644)
    files.changes.clear()
    assert files.ensure_file(CONF, "a = 1\nb = 3\n", mode=0o644) is True
    assert (tmp_path / "etc/devpi-agent/test.conf").read_text() == "a = 1\nb = 3\n"
    [change] = files.changes
    assert change.path == CONF
    assert change.diff.startswith(
        "--- /etc/devpi-agent/test.conf\n+++ /etc/devpi-agent/test.conf\n@@"
    )
    assert "-b = 2\n" in change.diff
    assert "+b = 3\n" in change.diff
    assert " a = 1\n" in change.diff


def test_ensure_file_diff_of_text_without_final_newline(files: Files) -> None:
    files.ensure_file(CONF, "old", mode=0o644)
    files.ensure_file(CONF, "new", mode=0o644)
    assert files.changes[-1].diff.endswith("-old\n+new\n")


def test_ensure_file_mode_change_alone(tmp_path: Path, files: Files) -> None:
    files.ensure_file(CONF, "a\n", mode=0o644)
    files.changes.clear()
    real = tmp_path / "etc/devpi-agent/test.conf"
    inode = real.stat().st_ino
    assert files.ensure_file(CONF, "a\n", mode=0o600) is True
    assert mode_of(real) == 0o600
    assert real.stat().st_ino == inode  # chmod in place, not rewritten
    assert [c.diff for c in files.changes] == ["mode 0644 -> 0600\n"]
    assert files.ensure_file(CONF, "a\n", mode=0o600) is False


def test_ensure_file_mode_and_content_change(files: Files) -> None:
    files.ensure_file(CONF, "a\n", mode=0o644)
    files.ensure_file(CONF, "b\n", mode=0o600)
    diff = files.changes[-1].diff
    assert diff.startswith("mode 0644 -> 0600\n--- ")
    assert "+b\n" in diff


def test_check_mode_writes_nothing_but_records_diff(tmp_path: Path) -> None:
    files = Files(root=tmp_path, chown=False, check=True)
    assert files.ensure_file(CONF, "a = 1\n", mode=0o644) is True
    assert not (tmp_path / "etc").exists()
    [change] = files.changes
    assert "+a = 1\n" in change.diff


def test_check_mode_on_existing_file(tmp_path: Path) -> None:
    real = tmp_path / "etc/devpi-agent/test.conf"
    Files(root=tmp_path, chown=False).ensure_file(CONF, "a\n", mode=0o644)
    files = Files(root=tmp_path, chown=False, check=True)
    assert files.ensure_file(CONF, "b\n", mode=0o600) is True
    assert real.read_text() == "a\n"
    assert mode_of(real) == 0o644
    assert "-a\n+b\n" in files.changes[0].diff
    assert files.ensure_file(CONF, "a\n", mode=0o644) is False


def test_secret_diff_hides_content(files: Files) -> None:
    assert files.ensure_file(CONF, "hunter2-secret\n", mode=0o600, secret=True) is True
    assert files.ensure_file(CONF, "other-secret\n", mode=0o600, secret=True) is True
    created, changed = (c.diff for c in files.changes)
    assert "hunter2" not in created
    assert "secret content created" in created
    assert "hunter2" not in changed
    assert "other-secret" not in changed
    assert "secret content changed" in changed


def test_record_false_records_nothing(tmp_path: Path, files: Files) -> None:
    assert files.ensure_file(CONF, "scratch\n", mode=0o644, record=False) is True
    assert (tmp_path / "etc/devpi-agent/test.conf").exists()
    assert files.ensure_file(CONF, "scratch 2\n", mode=0o600, record=False) is True
    assert files.changes == []


def test_bytes_content(tmp_path: Path, files: Files) -> None:
    data = bytes(range(256))
    assert files.ensure_file(CONF, data, mode=0o644) is True
    assert (tmp_path / "etc/devpi-agent/test.conf").read_bytes() == data
    assert files.ensure_file(CONF, data, mode=0o644) is False


def test_read_and_exists(files: Files) -> None:
    assert files.read(CONF) is None
    assert files.exists(CONF) is False
    files.ensure_file(CONF, "ä\n", mode=0o644)
    assert files.read(CONF) == "ä\n"
    assert files.exists(CONF) is True


def test_atomic_write_leaves_no_temp_files(tmp_path: Path, files: Files) -> None:
    for n in range(3):
        files.ensure_file(CONF, f"v{n}\n", mode=0o644)
    directory = tmp_path / "etc/devpi-agent"
    assert leftovers(directory) == []
    assert sorted(p.name for p in directory.iterdir()) == ["test.conf"]


def test_atomic_write_failure_keeps_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f.conf"
    atomic_write(target, b"old\n", mode=0o644, owner=None)

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, b"new\n", mode=0o644, owner=None)
    assert target.read_bytes() == b"old\n"
    assert leftovers(tmp_path) == []


def test_atomic_write_replaces_symlink_not_target(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("keep\n")
    link = tmp_path / "link.conf"
    link.symlink_to(outside)
    atomic_write(link, b"new\n", mode=0o600, owner=None)
    assert outside.read_text() == "keep\n"
    assert not link.is_symlink()
    assert link.read_text() == "new\n"


def test_ensure_dir(tmp_path: Path, files: Files) -> None:
    path = Path("/var/lib/devpi-agent/pending")
    real = tmp_path / "var/lib/devpi-agent/pending"
    assert files.ensure_dir(path, mode=0o700) is True
    assert real.is_dir()
    assert mode_of(real) == 0o700
    assert files.changes[-1].diff == f"directory {path}: create\n"
    assert files.ensure_dir(path, mode=0o700) is False
    assert files.ensure_dir(path, mode=0o750) is True
    assert mode_of(real) == 0o750
    assert "set mode 0750" in files.changes[-1].diff
    assert len(files.changes) == 2


def test_ensure_dir_check_mode(tmp_path: Path) -> None:
    files = Files(root=tmp_path, chown=False, check=True)
    assert files.ensure_dir(Path("/srv/x"), mode=0o755) is True
    assert not (tmp_path / "srv").exists()
    assert len(files.changes) == 1


def test_ensure_dir_over_a_file(tmp_path: Path, files: Files) -> None:
    files.ensure_file(CONF, "x\n", mode=0o644)
    with pytest.raises(NotADirectoryError):
        files.ensure_dir(CONF, mode=0o755)


def test_remove(tmp_path: Path, files: Files) -> None:
    assert files.remove(CONF) is False
    files.ensure_file(CONF, "x\n", mode=0o644)
    files.changes.clear()
    assert files.remove(CONF) is True
    assert not (tmp_path / "etc/devpi-agent/test.conf").exists()
    assert [c.diff for c in files.changes] == [f"remove {CONF}\n"]
    files.ensure_file(CONF, "x\n", mode=0o644, record=False)
    assert files.remove(CONF, record=False) is True
    assert len(files.changes) == 1


def test_remove_check_mode(tmp_path: Path) -> None:
    Files(root=tmp_path, chown=False).ensure_file(CONF, "x\n", mode=0o644)
    files = Files(root=tmp_path, chown=False, check=True)
    assert files.remove(CONF) is True
    assert (tmp_path / "etc/devpi-agent/test.conf").exists()


def test_chown_check_mode_tolerates_missing_user(tmp_path: Path) -> None:
    files = Files(root=tmp_path, chown=True, check=True)
    assert files.ensure_file(CONF, "x\n", mode=0o640, owner="no-such-user-xyz", group="root")


def test_chown_apply_mode_missing_user_raises(tmp_path: Path) -> None:
    files = Files(root=tmp_path, chown=True)
    with pytest.raises(KeyError):
        files.ensure_file(CONF, "x\n", mode=0o640, owner="no-such-user-xyz", group="root")


def test_render_strict_undefined() -> None:
    import jinja2

    with pytest.raises(jinja2.UndefinedError):
        render("devpi-server.yml.j2")
