"""Process, mount and cgroup plumbing for the nspawn test hosts (no host-level systemd here).

Everything in here looks at or changes this machine's /proc, mounts and cgroups on behalf of
nspawn.py; nothing knows about a host's contents.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


class HostError(RuntimeError):
    """A test host could not be built, booted or stopped."""


_PR_SET_PDEATHSIG = 1


_LIBC = ctypes.CDLL(None, use_errno=True)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise HostError(f"{name} not found in PATH (sudo make prereqs installs it)")
    return path


def tail(path: Path, chars: int = 6000) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return data[-chars:].decode(errors="replace")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (scans /proc; works for multi-threaded parents)."""
    return [p for p in _pids() if _stat_field(p, _PPID) == str(pid)]


def pgid_members(pgid: int) -> list[int]:
    return [p for p in _pids() if _stat_field(p, _PGRP) == str(pgid)]


# Fields of /proc/PID/stat after "pid (comm)": comm may hold spaces and parentheses.
_STATE, _PPID, _PGRP = 0, 1, 2


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _stat_field(pid: int, index: int) -> str | None:
    """One field of the process's stat line; None once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[index] if len(fields) > index else None


def kill_nsenter_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill a timed-out ``nsenter`` command: the command(s) first, nsenter last.

    nsenter forks the command into the container's PID namespace.  If nsenter
    died first, its child would be reparented to the *host's* init, and as an
    unreaped zombie it would hold up the container's shutdown (systemd-shutdown
    waits 10 s for it).  So kill everything else in the process group, let
    nsenter reap its child and exit, and only then kill nsenter if still needed.

    One pass is not enough: a command that forks while the group is being read
    (under load, ``sh -c 'sleep N'`` may still be starting its child after the
    timeout) leaves a child the pass did not see, which outlives its killed parent
    in the container.  So passes repeat until no live member is left, and the
    killed processes are waited for until they are gone (reaped), not only signalled.
    """
    killed: set[int] = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        live = [pid for pid in pgid_members(proc.pid) if pid != proc.pid and not _zombie(pid)]
        if not live:
            break
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed.update(live)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    while killed and time.monotonic() < deadline:
        killed = {pid for pid in killed if Path(f"/proc/{pid}").exists()}
        if killed:
            time.sleep(0.02)


def _zombie(pid: int) -> bool:
    return _stat_field(pid, _STATE) in (None, "Z")


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def same_ns(pid: int, ns: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/{ns}") == os.readlink(f"/proc/self/ns/{ns}")
    except OSError:
        return True


_MOUNTINFO_ESCAPE = re.compile(r"\\([0-7]{3})")


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path`` in the host mount namespace, deepest first."""
    prefix = str(path.resolve())
    found: list[Path] = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mnt = _MOUNTINFO_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if mnt == prefix or mnt.startswith(prefix + "/"):
                found.append(Path(mnt))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def umount_all(path: Path) -> None:
    for mnt in mounts_under(path):
        for attempt in range(20):
            res = subprocess.run([tool("umount"), str(mnt)], capture_output=True, check=False)
            if res.returncode == 0 or not mounts_under(mnt):
                break
            if attempt == 19:
                subprocess.run([tool("umount"), "-l", str(mnt)], check=False)
            time.sleep(0.1)
    left = mounts_under(path)
    if left:
        raise HostError(f"could not unmount {left}")


def safe_rmtree(path: Path) -> None:
    """Remove ``path`` -- but never while anything is mounted below it."""
    if not path.exists():
        return
    umount_all(path)
    shutil.rmtree(path)


#
# Without host systemd, systemd-nspawn --keep-unit splits *its own* cgroup into
# ".../supervisor" and ".../payload".  Two containers started from the same cgroup
# (e.g. the root cgroup here) would therefore share ".../payload" and their inner
# systemds would manage the very same unit cgroups (both journalds end up in
# /payload/system.slice/systemd-journald.service).  So every nspawn is first moved
# into a cgroup of its own.


def cgroup_hierarchies() -> list[Path]:
    """Our own cgroup dir in the hierarchies systemd uses (cgroup2 and name=systemd)."""
    own: dict[str, str] = {}
    with open("/proc/self/cgroup") as fh:
        for line in fh:
            hid, controllers, cpath = line.rstrip("\n").split(":", 2)
            if hid == "0" and controllers == "":
                own["cgroup2"] = cpath
            elif "name=systemd" in controllers.split(","):
                own["name=systemd"] = cpath
    dirs: list[Path] = []
    with open("/proc/self/mounts") as fh:
        for line in fh:
            _dev, mnt, fstype, opts, *_ = line.split()
            key = None
            if fstype == "cgroup2":
                key = "cgroup2"
            elif fstype == "cgroup" and "name=systemd" in opts.split(","):
                key = "name=systemd"
            if key is None or key not in own:
                continue
            candidate = Path(mnt) / own[key].lstrip("/")
            if candidate.is_dir():
                dirs.append(candidate)
    return dirs


def remove_nspawn_runtime_dirs(machine: str) -> None:
    """nspawn leaves /run/systemd/nspawn/propagate/<machine> behind if it is killed."""
    with contextlib.suppress(OSError):
        (Path("/run/systemd/nspawn/propagate") / machine).rmdir()


def make_cgroups(machine: str) -> list[Path]:
    made: list[Path] = []
    for hierarchy in cgroup_hierarchies():
        cg = hierarchy / "devpi-agent-tests" / machine
        try:
            cg.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        made.append(cg)
    return made


def remove_cgroup_tree(cg: Path, timeout: float = 5.0) -> None:
    if not cg.is_dir():
        return
    deadline = time.monotonic() + timeout
    while True:
        dirs = sorted(
            (Path(d) for d, _subdirs, _files in os.walk(cg)),
            key=lambda p: len(p.parts),
            reverse=True,
        )
        busy = False
        for d in dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                busy = True
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    with contextlib.suppress(OSError):
        cg.parent.rmdir()  # "devpi-agent-tests"; fails harmlessly while others use it


def ensure_child_setup(cgroups: Sequence[Path]) -> None:
    """preexec_fn for systemd-nspawn (runs between fork and exec)."""
    # If the test process dies, nspawn gets SIGTERM and shuts the container down
    # (nspawn itself gives its payload PDEATHSIG=SIGKILL).
    _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    for cg in cgroups:
        with contextlib.suppress(OSError):
            (cg / "cgroup.procs").write_text("0\n")
