"""apt-get as the agent runs it: non-interactive, needrestart suspended, services held stopped,
and bounded waits for every lock apt and dpkg take.

apt's own `DPkg::Lock::Timeout` covers dpkg's frontend lock only: `apt-get update` takes
/var/lib/apt/lists/lock, and install /var/cache/apt/archives/lock, without waiting, and fail at
once while apt-daily or unattended-upgrades holds them (a cloud image's first boot). So the agent
waits for all of them itself, bounded by `apt.lock_timeout`, and names the holder if it gives up.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.core.context import Context, StepFailed
from agent.core.files import render
from agent.core.runner import CommandFailed

APT_ENV = {
    "DEBIAN_FRONTEND": "noninteractive",
    # needrestart on Ubuntu asks on a terminal which services to restart; "a" restarts them.
    "NEEDRESTART_MODE": "a",
    # ...and restarts them after every apt run, interactive or not (it once killed cloud-final,
    # the unit the agent runs in: cloud-init#5109). The agent restarts what it changed itself.
    "NEEDRESTART_SUSPEND": "1",
    "APT_LISTCHANGES_FRONTEND": "none",
}
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
# Every lock apt-get and dpkg take, in the order apt takes them.
LOCKS = (
    Path("/var/lib/dpkg/lock-frontend"),
    Path("/var/lib/dpkg/lock"),
    Path("/var/cache/apt/archives/lock"),
    Path("/var/lib/apt/lists/lock"),
)
# apt-daily holds a lock for minutes: a look every second is often enough.
LOCK_POLL_SECONDS = 1.0
_LOCK_ERROR = re.compile(
    r"Could not get lock (?P<lock>/\S+?)[.\s]+(?:It is held by process (?P<pid>\d+)"
    r"(?: \((?P<program>[^)]*)\))?)?"
)
_NOT_FOUND = re.compile(r"Unable to locate package (?P<package>\S+)")
# The packages the agent installs that Ubuntu keeps in universe, not main.
UBUNTU_UNIVERSE = frozenset({"caddy", "supervisor"})


def apt_options(ctx: Context) -> list[str]:
    return [
        "-o",
        f"DPkg::Lock::Timeout={ctx.config.apt.lock_timeout}",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
    ]


@dataclass(frozen=True)
class LockHolder:
    lock: Path
    pid: int
    command: str

    def __str__(self) -> str:
        if self.pid <= 0:
            return f"{self.lock} is held (an open file description lock: no process named)"
        return f"{self.lock} is held by process {self.pid} ({self.command or 'gone'})"


def parse_proc_locks(text: str) -> dict[int, int]:
    """/proc/locks: inode -> pid of every lock held (POSIX and OFD record locks, flock); -1
    for an OFD lock, which names no process."""
    held: dict[int, int] = {}
    for line in text.splitlines():
        fields = line.split()
        # "1: POSIX  ADVISORY  WRITE 72 fd:01:1234 0 EOF"; a waiter's line has "->" after the id.
        if len(fields) < 6 or fields[1] == "->":
            continue
        try:
            pid = int(fields[4])
            inode = int(fields[5].rsplit(":", 1)[1])
        except (ValueError, IndexError):
            continue
        # An open file description lock names no process (-1), but it is held all the same.
        if pid > 0 or inode not in held:
            held[inode] = pid
    return held


def _command(pid: int, proc: Path) -> str:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ""
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)


def lock_holders(
    root: Path = Path("/"), proc: Path = Path("/proc"), locks: tuple[Path, ...] = LOCKS
) -> list[LockHolder]:
    """Who holds apt's and dpkg's locks right now (the kernel's view, without taking them)."""
    try:
        held = parse_proc_locks((proc / "locks").read_text())
    except OSError:
        return []
    holders = []
    for lock in locks:
        try:
            inode = (root / lock.relative_to("/")).stat().st_ino
        except OSError:
            continue
        pid = held.get(inode)
        if pid is not None and pid != os.getpid():
            holders.append(LockHolder(lock, pid, _command(pid, proc)))
    return holders


def wait_for_locks(
    ctx: Context,
    what: str,
    deadline: float,
    holders: Callable[[], list[LockHolder]] | None = None,
) -> float:
    """Bounded wait until no other process holds an apt or dpkg lock; the seconds waited.
    Past `deadline` (time.monotonic()), the step fails naming the lock and its holder."""
    look = holders or (lambda: lock_holders(ctx.files.host_path(Path("/"))))
    started = time.monotonic()
    announced = False
    while True:
        busy = look()
        if not busy:
            waited = time.monotonic() - started
            if announced:
                ctx.log.info("apt locks free", waited=round(waited, 1))
            return waited
        if not announced:
            ctx.log.info(
                "waiting for apt's locks",
                command=what,
                holders=[str(h) for h in busy],
                limit=ctx.config.apt.lock_timeout,
            )
            announced = True
        if time.monotonic() >= deadline:
            raise StepFailed(
                f"{what}: {busy[0]}; waited {time.monotonic() - started:.0f} s "
                f"(apt.lock_timeout = {ctx.config.apt.lock_timeout} s). Run again once the other "
                "package manager has finished, or raise apt.lock_timeout."
            )
        time.sleep(LOCK_POLL_SECONDS)


def apt_get(ctx: Context, *args: str, timeout: float, progress: str) -> None:
    """apt-get once every lock is free (waiting up to apt.lock_timeout in all); a lock taken
    by another process between the look and apt's own try is waited for again."""
    what = f"apt-get {args[0]}"
    deadline = time.monotonic() + ctx.config.apt.lock_timeout
    while True:
        wait_for_locks(ctx, what, deadline)
        try:
            ctx.runner.run(
                ["apt-get", *apt_options(ctx), *args],
                env=APT_ENV,
                timeout=ctx.config.apt.lock_timeout + timeout,
                progress=progress,
            )
            return
        except CommandFailed as failure:
            output = failure.result.stdout + failure.result.stderr
            match = _LOCK_ERROR.search(output)
            if match is None:
                _explain_not_found(ctx, output)
                raise
            if time.monotonic() < deadline:
                ctx.log.info("apt-get found a lock taken meanwhile; waiting", lock=match["lock"])
                continue
            holder = f"process {match['pid']}" if match["pid"] else "another process"
            if match["program"]:
                holder += f" ({match['program']})"
            raise StepFailed(
                f"{what}: {match['lock']} is held by {holder}; waited apt.lock_timeout = "
                f"{ctx.config.apt.lock_timeout} s for it. Run again once the other package "
                "manager has finished."
            ) from None


def universe_hint(os_id: str, output: str) -> str | None:
    """On Ubuntu, why apt cannot find caddy or supervisor: they are in universe,
    which stock images enable and hardened ones may not."""
    if os_id != "ubuntu":
        return None
    missing = sorted({m["package"] for m in _NOT_FOUND.finditer(output)} & UBUNTU_UNIVERSE)
    if not missing:
        return None
    return (
        f"apt cannot find {', '.join(missing)}: on Ubuntu they are in the universe component, "
        "which this host does not enable. Enable it (`sudo add-apt-repository universe`, or add "
        "`universe` to the Components of /etc/apt/sources.list.d/ubuntu.sources) and run again."
    )


def _explain_not_found(ctx: Context, output: str) -> None:
    hint = universe_hint(ctx.os.id, output)
    if hint is not None:
        raise StepFailed(hint)


def install(
    ctx: Context, packages: list[str], *, timeout: float = 1800, progress: str = "apt-get install"
) -> None:
    """apt-get install with services held stopped, so nothing starts with a stock config."""
    with services_held(ctx):
        apt_get(
            ctx,
            "install",
            "-y",
            "--no-install-recommends",
            *packages,
            timeout=timeout,
            progress=progress,
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
