"""apt: the system packages devpi and Caddy need, installed non-interactively.

Package lists are refreshed only when a package is missing and the lists are absent or stale.
Services are kept from starting during the install (policy-rc.d): Debian's caddy would otherwise
come up at once with its stock Caddyfile on :80 and localhost:2019, before the agent configured it.
"""

from __future__ import annotations

import base64
import re
import time
import urllib.request
from pathlib import Path

from agent.facts import installed_packages
from agent.files import render
from agent.runner import CommandFailed
from agent.steps.base import Context, StepFailed

NAME = "apt"
# openssl makes the replication CA and certificates (replica_pki.py).
PACKAGES = ["python3", "python3-venv", "supervisor", "caddy", "openssl"]
LISTS_DIR = Path("/var/lib/apt/lists")
LISTS_MAX_AGE = 24 * 3600
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
CADDY_KEYRING = Path("/usr/share/keyrings/caddy-stable-archive-keyring.gpg")
CADDY_LIST = Path("/etc/apt/sources.list.d/caddy-stable.list")
CADDY_KEY_URL = "https://dl.cloudsmith.io/public/caddy/stable/gpg.key"
DPKG_UPDATES = Path("/var/lib/dpkg/updates")
LISTS_PENDING = "apt-lists"


APT_ENV = {
    "DEBIAN_FRONTEND": "noninteractive",
    # needrestart on Ubuntu asks on a terminal which services to restart; "a" restarts them.
    "NEEDRESTART_MODE": "a",
    "APT_LISTCHANGES_FRONTEND": "none",
}


def apt_options(ctx: Context) -> list[str]:
    # unattended-upgrades holds the dpkg lock on a fresh Ubuntu boot; wait instead of failing.
    return [
        "-o",
        f"DPkg::Lock::Timeout={ctx.config.apt.lock_timeout}",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
    ]


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
                with urllib.request.urlopen(CADDY_KEY_URL, timeout=60) as response:
                    armored = response.read().decode("ascii")
            except OSError as error:
                raise StepFailed(
                    f"cannot download Caddy's key from {CADDY_KEY_URL}: {error}"
                ) from None
            ctx.files.ensure_file(CADDY_KEYRING, dearmor(armored), mode=0o644)
        changed = True
    content = render("caddy-stable.list.j2", keyring=str(CADDY_KEYRING))
    changed |= ctx.write(CADDY_LIST, content, mode=0o644)
    return changed


def converge(ctx: Context) -> None:
    remove_leftover_policy(ctx)
    if dpkg_interrupted(ctx) and ctx.change("finish an interrupted dpkg run (dpkg --configure -a)"):
        _finish_dpkg(ctx)
    sources_changed = False
    if ctx.config.caddy.source == "official":
        sources_changed = _official_caddy_repo(ctx)

    installed = installed_packages(ctx.runner, PACKAGES)
    missing = [name for name in PACKAGES if name not in installed]
    ctx.log.info("packages", installed=sorted(installed), missing=missing)

    need_update = bool(missing or ctx.config.apt.upgrade) and (
        sources_changed or ctx.is_pending(LISTS_PENDING) or not lists_are_fresh(ctx)
    )
    if need_update and ctx.change("refresh apt package lists"):
        # A run killed mid-update leaves some lists new and some old: fresh by their age, but
        # not consistent. The marker makes the next run update again.
        ctx.mark_pending(LISTS_PENDING)
        _apt_get(ctx, "update", timeout=600, progress="apt-get update")
        ctx.clear_pending(LISTS_PENDING)

    if ctx.config.apt.upgrade:
        _upgrade(ctx)

    if missing and ctx.change(f"install {' '.join(missing)}"):
        with services_held(ctx):
            _apt_get(
                ctx,
                "install",
                "-y",
                "--no-install-recommends",
                *missing,
                timeout=1800,
                progress="apt-get install",
            )
        now_installed = installed_packages(ctx.runner, PACKAGES)
        still_missing = [name for name in PACKAGES if name not in now_installed]
        if still_missing:
            raise StepFailed(f"apt-get finished but {' '.join(still_missing)} is not installed")


_LOCK_ERROR = re.compile(
    r"Could not get lock (?P<lock>/\S+?)[.\s]+(?:It is held by process (?P<pid>\d+)"
    r"(?: \((?P<program>[^)]*)\))?)?"
)


def _apt_get(ctx: Context, *args: str, timeout: float, progress: str) -> None:
    """apt-get, waiting up to apt.lock_timeout for the dpkg lock; a lock held longer than that
    fails the step with a message naming the lock and its holder."""
    try:
        ctx.runner.run(
            ["apt-get", *apt_options(ctx), *args],
            env=APT_ENV,
            timeout=ctx.config.apt.lock_timeout + timeout,
            progress=progress,
        )
    except CommandFailed as failure:
        match = _LOCK_ERROR.search(failure.result.stdout + failure.result.stderr)
        if match is None:
            raise
        holder = f"process {match['pid']}" if match["pid"] else "another process"
        if match["program"]:
            holder += f" ({match['program']})"
        raise StepFailed(
            f"apt-get {args[0]}: {match['lock']} is held by {holder}; waited "
            f"apt.lock_timeout = {ctx.config.apt.lock_timeout} s for it. Run again once the "
            "other package manager has finished."
        ) from None


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
    with services_held(ctx):
        result = ctx.runner.run(
            ["dpkg", "--force-confdef", "--force-confold", "--configure", "-a"],
            env=APT_ENV,
            timeout=1800,
            check=False,
            progress="dpkg --configure -a",
        )
    if not result.ok:
        ctx.log.warning("dpkg --configure -a failed", rc=result.returncode, output=result.tail())


def _upgrade(ctx: Context) -> None:
    simulation = ctx.runner.run(
        ["apt-get", *apt_options(ctx), "-s", "upgrade"], env=APT_ENV, timeout=600
    )
    pending = [
        line.split()[1] for line in simulation.stdout.splitlines() if line.startswith("Inst ")
    ]
    if pending and ctx.change(f"upgrade {len(pending)} packages", packages=pending[:20]):
        ctx.runner.run(
            ["apt-get", *apt_options(ctx), "upgrade", "-y"],
            env=APT_ENV,
            timeout=ctx.config.apt.lock_timeout + 3600,
            progress="apt-get upgrade",
        )


class services_held:
    """policy-rc.d refusing every start while apt runs; an existing foreign one is left alone."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.ours = render("policy-rc.d.j2")
        self.installed = False

    def __enter__(self) -> None:
        current = self.ctx.files.read(POLICY_RC_D)
        if current is None or current == self.ours:
            self.ctx.files.ensure_file(POLICY_RC_D, self.ours, mode=0o755, record=False)
            self.installed = True

    def __exit__(self, *exc: object) -> None:
        if self.installed:
            self.ctx.files.remove(POLICY_RC_D, record=False)


def remove_leftover_policy(ctx: Context) -> None:
    """A run killed mid-install leaves our policy-rc.d behind; it must not outlive the run."""
    if ctx.files.read(POLICY_RC_D) == render("policy-rc.d.j2") and not ctx.check:
        ctx.files.remove(POLICY_RC_D, record=False)
