"""apt: the system packages devpi and Caddy need, installed non-interactively.

Package lists are refreshed only when a package is missing and the lists are absent or stale.
Services are kept from starting during the install (policy-rc.d): Debian's caddy would otherwise
come up at once with its stock Caddyfile on :80 and localhost:2019, before the agent configured it.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

from agent.core.context import Context, StepFailed
from agent.core.download import DownloadFailed, download
from agent.core.files import render
from agent.core.paths import APT_LISTS
from agent.facts.system import installed_packages
from agent.host import apt

NAME = "apt"
# openssl makes the replication CA and certificates (replica_pki.py). No python3-venv: uv makes
# the venv (host/uv.py).
PACKAGES = ["python3", "supervisor", "caddy", "openssl"]
LISTS_DIR = Path("/var/lib/apt/lists")
LISTS_MAX_AGE = 24 * 3600
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
CADDY_KEYRING = Path("/usr/share/keyrings/caddy-stable-archive-keyring.gpg")
CADDY_LIST = Path("/etc/apt/sources.list.d/caddy-stable.list")
CADDY_KEY_URL = "https://dl.cloudsmith.io/public/caddy/stable/gpg.key"
DPKG_UPDATES = Path("/var/lib/dpkg/updates")


def lists_are_fresh(ctx: Context) -> bool:
    lists = ctx.files.host_path(LISTS_DIR)
    newest = max(
        (p.stat().st_mtime for p in lists.glob("*_Packages*")),
        default=0.0,
    )
    return time.time() - newest < LISTS_MAX_AGE


def dearmor(armored: str) -> bytes:
    """ASCII-armored OpenPGP key -> binary keyring, as `gpg --dearmor` does (no gpg needed)."""
    lines = armored.strip().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("-----BEGIN PGP"))
        end = next(i for i, line in enumerate(lines) if line.startswith("-----END PGP"))
    except StopIteration:
        raise ValueError("not an ASCII-armored OpenPGP key") from None
    body = lines[start + 1 : end]
    # Armor headers end at the first blank line; the checksum line starts with "=".
    if "" in body:
        body = body[body.index("") + 1 :]
    payload = "".join(line for line in body if not line.startswith("="))
    return base64.b64decode(payload, validate=True)


def _official_caddy_repo(ctx: Context) -> bool:
    """Caddy's own apt repository and its signing key; True when the sources changed."""
    changed = False
    if not ctx.files.exists(CADDY_KEYRING):
        if ctx.change(f"fetch Caddy's signing key into {CADDY_KEYRING}", url=CADDY_KEY_URL):
            try:
                armored = download(CADDY_KEY_URL, log=ctx.log, timeout=60).decode("ascii")
            except DownloadFailed as error:
                raise StepFailed(f"Caddy's signing key: {error}") from None
            ctx.files.ensure_file(CADDY_KEYRING, dearmor(armored), mode=0o644)
        changed = True
    content = render("caddy-stable.list.j2", keyring=str(CADDY_KEYRING))
    changed |= ctx.write(CADDY_LIST, content, mode=0o644)
    return changed


def converge(ctx: Context) -> None:
    apt.remove_leftover_policy(ctx)
    if dpkg_interrupted(ctx) and ctx.change("finish an interrupted dpkg run (dpkg --configure -a)"):
        _finish_dpkg(ctx)
    sources_changed = False
    if ctx.config.caddy.source == "official":
        sources_changed = _official_caddy_repo(ctx)

    installed = installed_packages(ctx.runner, PACKAGES)
    missing = [name for name in PACKAGES if name not in installed]
    ctx.log.info("packages", installed=sorted(installed), missing=missing)

    need_update = bool(missing or ctx.config.apt.upgrade) and (
        sources_changed or ctx.is_pending(APT_LISTS) or not lists_are_fresh(ctx)
    )
    if need_update and ctx.change("refresh apt package lists"):
        # A run killed mid-update leaves some lists new and some old: fresh by their age, but
        # not consistent. The marker makes the next run update again.
        ctx.mark_pending(APT_LISTS)
        apt.apt_get(ctx, "update", timeout=600, progress="apt-get update")
        ctx.clear_pending(APT_LISTS)

    if ctx.config.apt.upgrade:
        _upgrade(ctx)

    if missing and ctx.change(f"install {' '.join(missing)}"):
        apt.install(ctx, missing)
        now_installed = installed_packages(ctx.runner, PACKAGES)
        still_missing = [name for name in PACKAGES if name not in now_installed]
        if still_missing:
            raise StepFailed(f"apt-get finished but {' '.join(still_missing)} is not installed")


def dpkg_interrupted(ctx: Context) -> bool:
    """dpkg's journal holds entries (files named by digits), as apt checks before refusing
    with "dpkg was interrupted": a run (ours or another) was killed mid-install."""
    updates = ctx.files.host_path(DPKG_UPDATES)
    try:
        return any(entry.name.isdigit() for entry in updates.iterdir())
    except OSError:
        return False


def _finish_dpkg(ctx: Context) -> None:
    """What apt asks for after a killed install. A package left half-unpacked makes it exit
    non-zero; apt-get install then reinstalls that one, so the failure is only logged."""
    with apt.services_held(ctx):
        result = ctx.runner.run(
            ["dpkg", "--force-confdef", "--force-confold", "--configure", "-a"],
            env=apt.APT_ENV,
            timeout=1800,
            check=False,
            progress="dpkg --configure -a",
        )
    if not result.ok:
        ctx.log.warning("dpkg --configure -a failed", rc=result.returncode, output=result.tail())


def _upgrade(ctx: Context) -> None:
    simulation = ctx.runner.run(
        ["apt-get", *apt.apt_options(ctx), "-s", "upgrade"], env=apt.APT_ENV, timeout=600
    )
    pending = [
        line.split()[1] for line in simulation.stdout.splitlines() if line.startswith("Inst ")
    ]
    if pending and ctx.change(f"upgrade {len(pending)} packages", packages=pending[:20]):
        # Held as during an install: an upgraded caddy or supervisor must not restart with a
        # stock config or under the agent's feet; the agent restarts what it changed itself.
        with apt.services_held(ctx):
            apt.apt_get(ctx, "upgrade", "-y", timeout=3600, progress="apt-get upgrade")
