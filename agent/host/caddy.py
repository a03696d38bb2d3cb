"""Caddy as the agent drives it: as the caddy user (so no second CA appears under /root),
validated before it goes live, reloaded through its admin API or restarted, its port waited for.
"""

from __future__ import annotations

import json
import pwd
import re
import socket
from pathlib import Path

from agent.core.context import Context, StepFailed
from agent.core.paths import CADDYFILE, STATE_DIR
from agent.core.polling import wait_until
from agent.core.runner import Result
from agent.facts.system import caddy_version
from agent.host.supervisor import supervisorctl

CANDIDATE = CADDYFILE.with_name(".Caddyfile.devpi-agent-candidate")
# What Caddy listens on when the Caddyfile names no admin address (Debian's stock one).
CADDY_DEFAULT_ADMIN = "localhost:2019"
_ADMIN_LINE = re.compile(r"^\s*admin\s+(\S+)", re.MULTILINE)
# Debian and Ubuntu 24.04 both ship 2.6.2; assumed when Caddy is not installed yet (plan).
DISTRO_CADDY_VERSION = (2, 6, 2)
# `caddy version` of the binary with this (device, inode, size, mtime): it takes 0.06 s.
VERSION_CACHE = STATE_DIR / "caddy-version.json"


def installed_version(ctx: Context) -> tuple[int, int, int] | None:
    """`caddy version`, remembered for as long as the binary PATH finds is the same file: an
    upgrade or any other replacement gives it a new inode, size or mtime, and asks again."""
    path = ctx.runner.which("caddy")
    try:
        info = ctx.files.host_path(Path(path)).stat() if path else None
    except OSError:
        info = None
    if path is None or info is None:
        return caddy_version(ctx.runner)
    identity = [path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns]
    try:
        cached = json.loads(ctx.files.read(VERSION_CACHE) or "{}")
        if cached.get("binary") == identity:
            major, minor, patch = (int(part) for part in cached["version"])
            return major, minor, patch
    except (ValueError, TypeError, KeyError, AttributeError):
        pass  # damaged: ask caddy, and write it anew
    version = caddy_version(ctx.runner)
    if version is not None and not ctx.check:
        record = json.dumps({"binary": identity, "version": list(version)}) + "\n"
        ctx.files.ensure_dir(VERSION_CACHE.parent, mode=0o700, record=False)
        ctx.files.ensure_file(VERSION_CACHE, record, mode=0o644, record=False)
    return version


def basic_auth_directive(version: tuple[int, int, int]) -> str:
    """`basicauth` was renamed `basic_auth` in 2.8.0; 2.6 rejects the new name."""
    return "basic_auth" if version >= (2, 8, 0) else "basicauth"


def metrics_option(version: tuple[int, int, int]) -> str:
    """How a Caddyfile turns on request metrics: `servers { metrics }` from 2.6.0 (2.5 has no
    such option), the global `metrics` option from 2.9.0, which warns that the nested one is
    deprecated."""
    return "global" if version >= (2, 9, 0) else "servers"


def admin_address(caddyfile: str | None) -> str:
    """The admin address a Caddyfile gives Caddy."""
    match = _ADMIN_LINE.search(caddyfile or "")
    return match[1] if match else CADDY_DEFAULT_ADMIN


def restart(ctx: Context) -> None:
    if ctx.systemd:
        ctx.runner.run(["systemctl", "restart", "caddy"], timeout=120)
    else:
        supervisorctl(ctx, "restart", "caddy")


def caddy_home() -> str:
    try:
        return pwd.getpwnam("caddy").pw_dir
    except KeyError:
        return "/var/lib/caddy"


def run_as_caddy(ctx: Context, *args: str, check: bool = False) -> Result:
    home = caddy_home()
    return ctx.runner.run(
        ["caddy", *args],
        user="caddy",
        cwd=home,
        env={
            "HOME": home,
            "XDG_DATA_HOME": f"{home}/.local/share",
            "XDG_CONFIG_HOME": f"{home}/.config",
        },
        check=check,
        timeout=120,
    )


def validate(ctx: Context, candidate: str) -> None:
    ctx.files.ensure_file(
        CANDIDATE, candidate, mode=0o640, owner="root", group="caddy", record=False
    )
    try:
        result = run_as_caddy(ctx, "validate", "--config", str(CANDIDATE), "--adapter", "caddyfile")
    finally:
        ctx.files.remove(CANDIDATE, record=False)
    if not result.ok:
        raise StepFailed(
            "caddy validate rejected the new Caddyfile; the live one is unchanged:\n"
            + result.tail()
        )


def reload(ctx: Context) -> Result:
    return run_as_caddy(
        ctx, "reload", "--config", str(CADDYFILE), "--adapter", "caddyfile", "--force"
    )


def wait_for_https(ctx: Context, timeout: float = 30) -> None:
    port = ctx.config.server.https_port
    last: list[OSError] = []

    def accepts() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return True
        except OSError as error:
            last[:] = [error]
            return False

    if not wait_until(accepts, timeout, first=0.2, most=0.2):
        raise StepFailed(f"Caddy does not accept connections on port {port}: {last[0]}")
