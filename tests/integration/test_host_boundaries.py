"""What the agent may touch on a host and who may reach what it runs, on one host with systemd:

- the TCP form of `server.caddy_admin` works on loopback and warns that every local user can
  reach it; switching to the unix socket (the default) locks unprivileged users out;
- a configured file inside a system directory (/etc) and a backup dir inside one (/var/backups)
  leave those directories' mode and owner alone, and a configured directory that is a system
  directory is refused before anything changes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from admin_api import admin_address, assert_locked_out, probe
from agenthost import AGENT, CONFIG, DIST, ApplyRun, Ports, apply, config_text
from nspawn import NspawnHost, free_port

SYSTEM_DIRS = ("/etc", "/var/backups", "/var/lib")
ROOT_PASSWORD_FILE = "/etc/devpi-root.pass"
BACKUP_DIR = "/var/backups/devpi-agent-test"


def _config(ports: Ports, *, admin: str | None, backup_dir: str = BACKUP_DIR) -> str:
    text = config_text(ports).replace(
        "[devpi]\n", f'[devpi]\nroot_password_file = "{ROOT_PASSWORD_FILE}"\n'
    )
    text += f'\n[backup]\ndir = "{backup_dir}"\n'
    if admin is not None:
        text = text.replace("[server]\n", f'[server]\ncaddy_admin = "{admin}"\n')
    return text


def _meta(host: NspawnHost, path: str) -> tuple[str, int, int]:
    st = os.stat(host.path(path))
    return (f"{stat.S_IMODE(st.st_mode):04o}", st.st_uid, st.st_gid)


@dataclass
class Host:
    host: NspawnHost
    ports: Ports
    before: dict[str, tuple[str, int, int]]
    first: ApplyRun
    second: ApplyRun


@pytest.fixture(scope="module")
def tcp_host(rootfs: Path) -> Iterator[Host]:
    assert DIST.exists(), f"{DIST} is missing: run `make dist` first"
    ports = Ports.free()
    host = NspawnHost(rootfs)
    try:
        host.prepare()
        host.copy_in(DIST, AGENT, mode=0o755)
        host.write(CONFIG, _config(ports, admin=f"127.0.0.1:{ports.admin}"), mode=0o600)
        before = {path: _meta(host, path) for path in SYSTEM_DIRS}
        host.start(systemd=True)
        first = apply(host)
        second = apply(host)
        yield Host(host, ports, before, first, second)
    except BaseException:
        print(host.debug_report())
        raise
    finally:
        host.stop()


def test_tcp_admin_on_loopback_works_and_warns(tcp_host: Host) -> None:
    assert tcp_host.first.returncode == 0, tcp_host.first.stderr[-5000:]
    assert tcp_host.second.returncode == 0 and tcp_host.second.report["changed"] == 0
    assert admin_address(tcp_host.host) == f"127.0.0.1:{tcp_host.ports.admin}"
    warning = "server.caddy_admin is a TCP port: every local user can reach it"
    assert warning in tcp_host.first.stderr, tcp_host.first.stderr[-3000:]
    # The warning is true: TCP has no owner, so an unprivileged user gets Caddy's config.
    seen = probe(tcp_host.host, admin_address(tcp_host.host), user="nobody", port=free_port())
    print("nobody through the TCP admin port:", seen["get"])
    assert seen["get"].get("status") == 200


def test_system_dirs_keep_mode_and_owner(tcp_host: Host) -> None:
    assert tcp_host.first.returncode == 0, tcp_host.first.stderr[-5000:]
    after = {path: _meta(tcp_host.host, path) for path in SYSTEM_DIRS}
    assert after == tcp_host.before
    assert _meta(tcp_host.host, ROOT_PASSWORD_FILE)[0] == "0600"
    assert _meta(tcp_host.host, BACKUP_DIR)[0] == "0700"


def test_a_system_dir_as_backup_dir_is_refused(tcp_host: Host) -> None:
    host = tcp_host.host
    bad = _config(
        tcp_host.ports, admin=f"127.0.0.1:{tcp_host.ports.admin}", backup_dir="/var/backups"
    )
    host.write("/tmp-system-dir.toml", bad, mode=0o600)
    run = apply(host, config="/tmp-system-dir.toml")
    assert run.returncode == 2, run.stderr[-3000:]
    assert "backup.dir" in run.stderr
    assert _meta(host, "/var/backups") == tcp_host.before["/var/backups"]


def test_switching_to_the_unix_socket_locks_users_out(tcp_host: Host) -> None:
    host = tcp_host.host
    host.write(CONFIG, _config(tcp_host.ports, admin=None), mode=0o600)
    switched = apply(host)
    assert switched.returncode == 0, switched.stderr[-5000:]
    assert admin_address(host).startswith("unix/")
    assert_locked_out(host, free_port())
    # Debian's unit reloads with `caddy reload` as caddy, through the address in the Caddyfile.
    host.run(["systemctl", "reload", "caddy"], timeout=120)
    assert_locked_out(host, free_port())
    again = apply(host)
    assert again.returncode == 0 and again.report["changed"] == 0, again.report
