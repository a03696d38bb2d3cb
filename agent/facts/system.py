"""Facts: what the host is. Read-only looks, cheap enough to take on every run."""

from __future__ import annotations

import pwd
import re
from pathlib import Path

from agent.core.platform import OsRelease
from agent.core.runner import Runner

OS_RELEASE = Path("/etc/os-release")
SYSTEMD_MARKER = Path("/run/systemd/system")


def parse_os_release(text: str) -> OsRelease:
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip("\"'")
    return OsRelease(
        id=values.get("ID", "unknown"),
        version_id=values.get("VERSION_ID", ""),
        codename=values.get("VERSION_CODENAME", ""),
    )


def os_release(root: Path = Path("/")) -> OsRelease:
    try:
        return parse_os_release((root / OS_RELEASE.relative_to("/")).read_text())
    except FileNotFoundError:
        return OsRelease("unknown", "", "")


def systemd_running(root: Path = Path("/")) -> bool:
    """sd_booted(): systemd is PID 1 exactly when this directory exists."""
    return (root / SYSTEMD_MARKER.relative_to("/")).is_dir()


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def installed_packages(runner: Runner, names: list[str]) -> dict[str, str]:
    """Package name -> version for those of `names` that dpkg has fully installed."""
    result = runner.run(
        ["dpkg-query", "-W", "-f=${Package}\t${db:Status-Abbrev}\t${Version}\n", *names],
        check=False,
        timeout=60,
    )
    installed: dict[str, str] = {}
    for line in result.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[1].strip() == "ii":
            installed[parts[0]] = parts[2]
    return installed


_CADDY_VERSION = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")


def parse_caddy_version(text: str) -> tuple[int, int, int] | None:
    """`caddy version` prints e.g. "v2.6.2 h1:..." upstream, "2.6.2" in some distro builds."""
    match = _CADDY_VERSION.search(text)
    if not match:
        return None
    return int(match[1]), int(match[2]), int(match[3])


def caddy_version(runner: Runner) -> tuple[int, int, int] | None:
    result = runner.run(["caddy", "version"], check=False, timeout=30)
    return parse_caddy_version(result.stdout) if result.ok else None
