"""What a no-op apply no longer asks every time: `caddy version` while the binary is the same
file, and systemd's unit states in one `systemctl show`."""

from __future__ import annotations

import functools
import os
import stat
from pathlib import Path

import pytest
from conftest import ACTIVE_AND_ENABLED, FakeRunner, make_ctx, reference_config

from agent.facts.systemd import UnitState, unit_state
from agent.host import caddy

VERSION = "v2.6.2 h1:abc=\n"


def caddy_binary(tmp_path: Path, content: bytes = b"caddy 2.6.2") -> Path:
    binary = tmp_path / "usr/bin/caddy"
    binary.parent.mkdir(parents=True, exist_ok=True)
    binary.write_bytes(content)
    return binary


def version_calls(runner: FakeRunner) -> int:
    return len(runner.ran(["caddy", "version"]))


def test_caddy_version_is_asked_once_for_the_same_binary(tmp_path: Path) -> None:
    caddy_binary(tmp_path)
    runner = FakeRunner().on(["caddy", "version"], stdout=VERSION)
    for _ in range(3):
        ctx = make_ctx(tmp_path, reference_config(), runner)
        assert caddy.installed_version(ctx) == (2, 6, 2)
        assert ctx.changes == []
    assert version_calls(runner) == 1


def test_a_replaced_caddy_binary_is_asked_again(tmp_path: Path) -> None:
    binary = caddy_binary(tmp_path)
    runner = FakeRunner().on(["caddy", "version"], stdout=VERSION)
    caddy.installed_version(make_ctx(tmp_path, reference_config(), runner))
    # An upgrade: dpkg unpacks a new file and renames it over the old one (a new inode).
    new = binary.with_name("caddy.dpkg-new")
    new.write_bytes(b"caddy 2.8.4 with more bytes")
    os.replace(new, binary)
    upgraded = FakeRunner().on(["caddy", "version"], stdout="v2.8.4 h1:def=\n")
    ctx = make_ctx(tmp_path, reference_config(), upgraded)
    assert caddy.installed_version(ctx) == (2, 8, 4)
    assert version_calls(upgraded) == 1
    # The same file rewritten in place with the same size: its mtime moves.
    stat = binary.stat()
    os.utime(binary, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    again = FakeRunner().on(["caddy", "version"], stdout="v2.8.5 h1:ghi=\n")
    assert caddy.installed_version(make_ctx(tmp_path, reference_config(), again)) == (2, 8, 5)


def test_caddy_version_failing_is_never_remembered(tmp_path: Path) -> None:
    caddy_binary(tmp_path)
    broken = FakeRunner().on(["caddy", "version"], rc=1, stderr="segfault\n")
    for _ in range(2):
        assert caddy.installed_version(make_ctx(tmp_path, reference_config(), broken)) is None
    assert version_calls(broken) == 2
    assert not (tmp_path / "var/lib/devpi-agent/caddy-version.json").exists()


def test_no_caddy_binary_asks_caddy_as_before(tmp_path: Path) -> None:
    runner = FakeRunner().on(["caddy", "version"], rc=127)
    assert caddy.installed_version(make_ctx(tmp_path, reference_config(), runner)) is None
    runner.missing_programs.add("caddy")
    assert caddy.installed_version(make_ctx(tmp_path, reference_config(), runner)) is None
    assert version_calls(runner) == 2


def test_plan_writes_no_cache_and_a_damaged_cache_is_rewritten(tmp_path: Path) -> None:
    caddy_binary(tmp_path)
    runner = FakeRunner().on(["caddy", "version"], stdout=VERSION)
    cache = tmp_path / "var/lib/devpi-agent/caddy-version.json"
    assert caddy.installed_version(make_ctx(tmp_path, reference_config(), runner, check=True))
    assert not cache.exists()
    caddy.installed_version(make_ctx(tmp_path, reference_config(), runner))
    cache.write_text('{"binary": "not a list", "version": [2]}\n')
    assert caddy.installed_version(make_ctx(tmp_path, reference_config(), runner)) == (2, 6, 2)
    assert version_calls(runner) == 3
    assert caddy.installed_version(make_ctx(tmp_path, reference_config(), runner)) == (2, 6, 2)
    assert version_calls(runner) == 3


def test_a_units_state_is_one_systemctl_show() -> None:
    runner = FakeRunner().on(["systemctl", "show", "caddy"], stdout=ACTIVE_AND_ENABLED)
    state = unit_state(runner, "caddy")
    assert state == UnitState("active", "enabled") and state.running_and_enabled
    assert [c.argv for c in runner.calls] == [
        ("systemctl", "show", "caddy", "--property=ActiveState,UnitFileState")
    ]
    # A unit systemd does not know: `is-enabled` printed nothing, `is-active` "inactive".
    missing = FakeRunner().on(
        ["systemctl", "show"], stdout="ActiveState=inactive\nUnitFileState=\n"
    )
    assert unit_state(missing, "nothing") == UnitState("inactive", "unknown")
    assert unit_state(FakeRunner().on(["systemctl"], rc=1), "x") == UnitState("unknown", "unknown")


def test_compiled_templates_are_kept_only_in_a_directory_root_alone_owns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.core import files

    monkeypatch.setattr(files, "_template_cache", [])
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(files, "_templates", functools.cache(files._templates.__wrapped__))
    rendered = files.render("policy-rc.d.j2")
    cache = tmp_path / "cache" / "jinja"
    (tmp_path / "cache").mkdir(mode=0o700)
    owned_by_root = os.getuid() == 0
    files.cache_compiled_templates(cache)
    if not owned_by_root:
        assert files._template_cache == []  # a directory root does not own: no cache
        return
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert files.render("policy-rc.d.j2") == rendered
    [compiled] = list(cache.iterdir())
    # A second process: the template comes from the cache, and renders the same.
    files._templates.cache_clear()
    assert files.render("policy-rc.d.j2") == rendered
    assert list(cache.iterdir()) == [compiled]
    # Group- or world-writable: not trusted (it holds code), compiled every time.
    monkeypatch.setattr(files, "_template_cache", [])
    os.chmod(cache, 0o770)
    files.cache_compiled_templates(cache)
    assert files._template_cache == []
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    os.chmod(cache, 0o700)
    files.cache_compiled_templates(cache)
    assert files._template_cache == []
