"""What the agent may change on a host (directories it did not make) and which admin addresses
Caddy may get (anything but a private socket or loopback is open to others).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from conftest import ACTIVE_AND_ENABLED, FakeRunner, make_ctx, reference_data

from agent.core import paths
from agent.core.config import Config, ConfigError, parse
from agent.core.context import StepFailed
from agent.core.files import OWNED_DIRS, DirectoryNotOwned, Files
from agent.steps import backup, caddy, devpi_init, service_user


def config(**tables: dict[str, Any]) -> Config:
    data = reference_data()
    for name, values in tables.items():
        data.setdefault(name, {}).update(values)
    return parse(data)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def system_dir(root: Path, path: str, mode: int = 0o755) -> Path:
    """A directory as the distribution made it, before the agent ever ran."""
    real = root / path.lstrip("/")
    real.mkdir(parents=True, exist_ok=True)
    real.chmod(mode)
    return real


# --- item 4's examples ------------------------------------------------------------------------


def test_root_password_file_in_etc_leaves_etc_alone(tmp_path: Path) -> None:
    etc = system_dir(tmp_path, "/etc")
    ctx = make_ctx(tmp_path, config(devpi={"root_password_file": "/etc/devpi-root.pass"}), None)
    devpi_init.ensure_root_password(ctx)
    assert mode_of(etc) == 0o755, "the agent re-permissioned /etc"
    assert mode_of(etc / "devpi-root.pass") == 0o600
    assert "make directory /etc" not in ctx.changes


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        ("backup", "dir", "/var/backups"),
        ("devpi", "home", "/var/lib"),
        ("devpi", "home", "/var/lib/"),
        ("devpi", "home", "/var/lib/../lib"),
        ("devpi", "venv", "/opt"),
        ("backup", "dir", "/"),
        ("backup", "dir", "/etc"),
    ],
)
def test_a_system_directory_as_configured_directory_is_refused(
    table: str, key: str, value: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config(**{table: {key: value}})
    assert caught.value.key == f"{table}.{key}"
    assert "system directory" in caught.value.message


def test_backup_dir_inside_var_backups_leaves_it_alone(tmp_path: Path) -> None:
    backups = system_dir(tmp_path, "/var/backups")
    ctx = make_ctx(tmp_path, config(backup={"dir": "/var/backups/devpi"}), FakeRunner())
    ctx.mkdir(Path("/var/backups/devpi"), mode=0o700, key="backup.dir")
    assert mode_of(backups) == 0o755
    assert mode_of(backups / "devpi") == 0o700


def test_devpi_home_inside_var_lib_leaves_it_alone(tmp_path: Path) -> None:
    var_lib = system_dir(tmp_path, "/var/lib")
    ctx = make_ctx(tmp_path, config(), FakeRunner())
    ctx.mkdir(Path("/var/lib/devpi"), mode=0o750, key="devpi.home")
    assert mode_of(var_lib) == 0o755 and mode_of(var_lib / "devpi") == 0o750


# --- the rule: mode and owner only on the agent's own directories ------------------------------


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(root=tmp_path, chown=False)


def test_an_existing_directory_the_agent_did_not_make_is_refused(
    tmp_path: Path, files: Files
) -> None:
    shared = system_dir(tmp_path, "/srv/shared", mode=0o775)
    with pytest.raises(DirectoryNotOwned, match=r"backup.dir: /srv/shared exists .* 0775"):
        files.ensure_dir(Path("/srv/shared"), mode=0o700, key="backup.dir")
    assert mode_of(shared) == 0o775 and files.changes == []


def test_the_refusal_fails_the_step_with_the_message(tmp_path: Path) -> None:
    system_dir(tmp_path, "/srv/devpi", mode=0o755)
    ctx = make_ctx(tmp_path, config(devpi={"home": "/srv/devpi"}), FakeRunner())
    with pytest.raises(StepFailed, match=r"devpi\.home: /srv/devpi exists and devpi-agent did not"):
        service_user.converge(ctx)


def test_an_existing_directory_already_as_wanted_is_adopted(tmp_path: Path, files: Files) -> None:
    system_dir(tmp_path, "/srv/backups", mode=0o700)
    assert files.ensure_dir(Path("/srv/backups"), mode=0o700, key="backup.dir") is False
    assert Path("/srv/backups") in files.owned_dirs()
    # Adopted: from now on the agent keeps it as configured.
    (tmp_path / "srv/backups").chmod(0o755)
    assert files.ensure_dir(Path("/srv/backups"), mode=0o700, key="backup.dir") is True
    assert mode_of(tmp_path / "srv/backups") == 0o700


def test_a_directory_the_agent_made_is_kept_as_configured(tmp_path: Path, files: Files) -> None:
    assert files.ensure_dir(Path("/srv/devpi/backups"), mode=0o700, key="backup.dir") is True
    assert files.ensure_dir(Path("/srv/devpi/backups"), mode=0o700, key="backup.dir") is False
    (tmp_path / "srv/devpi/backups").chmod(0o755)
    assert files.ensure_dir(Path("/srv/devpi/backups"), mode=0o700, key="backup.dir") is True
    assert mode_of(tmp_path / "srv/devpi/backups") == 0o700
    # The record is root's alone; the intermediate /srv/devpi is made but never re-permissioned.
    assert mode_of(tmp_path / OWNED_DIRS.relative_to("/")) == 0o600
    assert Path("/srv/devpi") not in files.owned_dirs()


def test_a_directory_made_by_a_killed_run_is_still_the_agents(
    tmp_path: Path, files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_chmod = os.chmod

    def killed(path: Any, mode: int, **kwargs: Any) -> None:
        raise KeyboardInterrupt("SIGKILL between mkdir and chmod")

    monkeypatch.setattr(os, "chmod", killed)
    with pytest.raises(KeyboardInterrupt):
        files.ensure_dir(Path("/srv/backups"), mode=0o700, key="backup.dir")
    monkeypatch.setattr(os, "chmod", real_chmod)
    assert (tmp_path / "srv/backups").is_dir() and mode_of(tmp_path / "srv/backups") != 0o700
    again = Files(root=tmp_path, chown=False)
    assert again.ensure_dir(Path("/srv/backups"), mode=0o700, key="backup.dir") is True
    assert mode_of(tmp_path / "srv/backups") == 0o700


def test_a_parent_of_a_file_is_made_if_missing_and_then_kept(tmp_path: Path, files: Files) -> None:
    secret = Path("/etc/devpi-agent/root.pass")
    system_dir(tmp_path, "/etc")
    assert files.ensure_parent(secret, mode=0o700) is True
    assert mode_of(tmp_path / "etc/devpi-agent") == 0o700
    (tmp_path / "etc/devpi-agent").chmod(0o755)
    assert files.ensure_parent(secret, mode=0o700) is True
    assert mode_of(tmp_path / "etc/devpi-agent") == 0o700
    assert mode_of(tmp_path / "etc") == 0o755


def test_an_existing_parent_of_a_file_is_never_changed(tmp_path: Path, files: Files) -> None:
    operator_made = system_dir(tmp_path, "/etc/devpi-agent", mode=0o750)
    assert files.ensure_parent(Path("/etc/devpi-agent/root.pass"), mode=0o700) is False
    assert mode_of(operator_made) == 0o750 and files.changes == []


def test_plan_records_nothing(tmp_path: Path) -> None:
    plan = Files(root=tmp_path, chown=False, check=True)
    assert plan.ensure_dir(Path("/srv/backups"), mode=0o700, key="backup.dir") is True
    assert not (tmp_path / "srv").exists() and not (tmp_path / "var").exists()


def test_the_backup_step_refuses_a_foreign_backup_dir(tmp_path: Path) -> None:
    system_dir(tmp_path, "/srv/backups", mode=0o755)
    ctx = make_ctx(tmp_path, config(backup={"dir": "/srv/backups"}), FakeRunner())
    with pytest.raises(StepFailed, match=r"backup\.dir"):
        backup.converge(ctx)


# --- item 3: Caddy's admin address --------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "unix//var/lib/caddy-admin/admin.sock",
        "unix//srv/caddy/admin.sock",
        "localhost:2019",
        "127.0.0.1:2019",
        "127.3.4.5:2020",
        "[::1]:2019",
    ],
)
def test_private_admin_addresses_are_taken(address: str) -> None:
    assert config(server={"caddy_admin": address}).server.caddy_admin == address


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("0.0.0.0:2019", "not on loopback"),
        (":2019", "neither"),
        ("[::]:2019", "not on loopback"),
        ("10.0.0.5:2019", "not on loopback"),
        ("pypi.example.com:2019", "not on loopback"),
        ("off", "cannot be off"),
        ("", "cannot be off"),
        ("unix/admin.sock", "absolute"),
        ("unix//var/lib/caddy-admin/../admin.sock", "absolute"),
        ("unix//var/lib/caddy-admin/admin.sock|0666", "absolute"),
        ("unix//var/lib/caddy-admin/a b.sock", "absolute"),
        ("unix//run/admin.sock", "system directory"),
        ("unix//tmp/admin.sock", "system directory"),
        ("unix//" + "a" * 120 + "/admin.sock", "bytes"),
    ],
)
def test_other_admin_addresses_are_refused(address: str, why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(server={"caddy_admin": address})
    assert caught.value.key == "server.caddy_admin"
    assert why in caught.value.message


def test_the_admin_socket_directory_is_caddys_alone(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, config(), FakeRunner())
    caddy.ensure_admin_socket_dir(ctx)
    assert mode_of(tmp_path / "var/lib/caddy-admin") == 0o700
    assert caddy.admin_address(caddy.content(ctx, (2, 6, 2), None)) == (
        "unix//var/lib/caddy-admin/admin.sock"
    )


def test_a_tcp_admin_address_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ctx = make_ctx(tmp_path, config(server={"caddy_admin": "127.0.0.1:2019"}), FakeRunner())
    caddy.ensure_admin_socket_dir(ctx)
    captured = capsys.readouterr()
    assert "every local user can reach it" in captured.out + captured.err


def test_a_changed_admin_address_restarts_caddy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`caddy reload` talks to the address in the new file, where the old Caddy is not."""
    monkeypatch.setattr(caddy, "BCRYPT_ROUNDS", 4)
    monkeypatch.setattr(caddy, "wait_for_https", lambda ctx, timeout=30: None)
    live = tmp_path / "etc/caddy/Caddyfile"
    live.parent.mkdir(parents=True)
    live.write_text("{\n\tadmin localhost:2019\n}\n")
    runner = FakeRunner()
    runner.on(["caddy", "version"], stdout="v2.6.2 h1:x=\n")
    runner.on(["systemctl", "show"], stdout=ACTIVE_AND_ENABLED)
    ctx = make_ctx(tmp_path, config(), runner)
    caddy.converge(ctx)
    assert runner.ran(["systemctl", "restart", "caddy"]) and not runner.ran(["caddy", "reload"])
    assert not ctx.is_pending(paths.CADDY_RESTART)
    second = FakeRunner()
    second.on(["caddy", "version"], stdout="v2.6.2 h1:x=\n")
    second.on(["systemctl", "show"], stdout=ACTIVE_AND_ENABLED)
    again = make_ctx(tmp_path, config(), second)
    caddy.converge(again)
    assert again.changes == [] and not second.ran(["systemctl", "restart"])
