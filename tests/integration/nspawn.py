"""Disposable Debian test hosts for the integration tests, built on systemd-nspawn.

The host running the tests does not need systemd: containers are started with
``--register=no --keep-unit`` and entered with ``nsenter``.  They share the host's
network namespace, so services inside listen on the host's loopback (use
:func:`free_port` to pick ports).

Typical use::

    rootfs = build_rootfs(default_cache_dir())
    with NspawnHost(rootfs) as host:
        host.start()  # boots systemd; start(systemd=False) gives a host without init
        host.run(["apt-get", "update"])

Environment variables:

``DEVPI_AGENT_TEST_CACHE``
    where the base rootfs is cached (default ``/var/cache/devpi-agent-tests``).
``DEVPI_AGENT_TEST_WORKDIR``
    where per-host scratch dirs go (default: the system temp dir).
``DEVPI_AGENT_TEST_ROOTFS_MODE``
    ``overlay`` (default when it works), ``copy`` (``cp -a --reflink=auto``) or ``auto``.
``DEVPI_AGENT_TEST_KEEP``
    set to ``1`` to keep each host's scratch dir (rootfs copy, logs) after ``stop()``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol

from hostprocs import (
    HostError,
    children,
    cmdline,
    comm,
    ensure_child_setup,
    kill_nsenter_group,
    make_cgroups,
    pid_alive,
    remove_cgroup_tree,
    remove_nspawn_runtime_dirs,
    safe_rmtree,
    same_ns,
    tail,
    tool,
    umount_all,
)
from rootfs import (
    BASE_HOSTNAME,
    ETC_HOSTS,
    INNER_PATH,
    build_rootfs,
    default_cache_dir,
)

# The names tests import from here, whichever module holds them now.
__all__ = [
    "BASE_HOSTNAME",
    "ETC_HOSTS",
    "HostCommandError",
    "HostError",
    "HostFactory",
    "NspawnHost",
    "build_rootfs",
    "check_host_support",
    "cleanup_stale",
    "default_cache_dir",
    "free_port",
    "running_host",
]

# --------------------------------------------------------------------------- constants

#: Mounted by systemd-nspawn inside the container: not visible in the rootfs dir.
VOLATILE_MOUNTS: tuple[str, ...] = ("/run", "/tmp", "/dev", "/proc", "/sys")

REQUIRED_TOOLS: tuple[str, ...] = (
    "mmdebstrap",
    "systemd-nspawn",
    "nsenter",
    "chroot",
    "cp",
    "mount",
    "umount",
)

RootfsMode = Literal["auto", "overlay", "copy"]


class HostCommandError(subprocess.CalledProcessError):
    """``NspawnHost.run(check=True)`` failed; the message includes the output."""

    def __str__(self) -> str:
        msg = super().__str__()
        for label, data in (("stdout", self.stdout), ("stderr", self.stderr)):
            if data:
                text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
                msg += f"\n--- {label} (last 4000 chars) ---\n{text[-4000:]}"
        return msg


# --------------------------------------------------------------------------- helpers


# Ports for the services tests start, below Linux's ephemeral range (32768-60999), so that no
# port the kernel picks (bind to port 0, a client's outgoing connection) can land on one. Each
# xdist worker has a block of its own and hands out every port of it at most once per lap:
# a port chosen while another test's host has its port chosen but its Caddy not yet started
# would not show as taken, and Caddy (SO_REUSEPORT, listen_unix.go since 2.6.1) binds a port
# another Caddy holds without an error, the kernel then sharing the connections between the
# two (CI: twine reached the wrong host's Caddy, "unable to get local issuer certificate").
_PORTS_FROM = 11000
_PORTS_PER_BLOCK = 1500
_XDIST_BLOCKS = 8
_OTHER_BLOCKS = 6  # (11000 + 14 * 1500 = 32000) pytest without xdist, tools/demo.py
_port_lock = threading.Lock()
_port_turns = itertools.count()


def _port_block() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "").removeprefix("gw")
    if worker.isdigit():
        return int(worker) % _XDIST_BLOCKS
    return _XDIST_BLOCKS + os.getpid() % _OTHER_BLOCKS


def free_port() -> int:
    """A TCP port free on 127.0.0.1 that no other caller in this process has been given.

    Hosts share this machine's network namespace, so every service a test starts inside
    must get its own port. Ports come from this process's block (above), in turn.
    """
    first = _PORTS_FROM + _port_block() * _PORTS_PER_BLOCK
    with _port_lock:
        for _ in range(_PORTS_PER_BLOCK):
            port = first + next(_port_turns) % _PORTS_PER_BLOCK
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise HostError(f"no free port in {first}-{first + _PORTS_PER_BLOCK - 1}")


def default_workdir() -> Path:
    base = os.environ.get("DEVPI_AGENT_TEST_WORKDIR") or tempfile.gettempdir()
    return Path(base) / "devpi-agent-nspawn"


def check_host_support() -> list[str]:
    """Return the reasons this machine cannot run the integration tests (empty if it can)."""
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("must run as root (systemd-nspawn, mount, nsenter need it)")
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        problems.append(
            "missing tools: "
            + ", ".join(missing)
            + " (sudo make prereqs, or sudo tools/install-prereqs.sh, installs them)"
        )
    return problems


# --------------------------------------------------------------------------- hosts


def _env_rootfs_mode() -> RootfsMode:
    value = os.environ.get("DEVPI_AGENT_TEST_ROOTFS_MODE", "auto")
    if value == "overlay":
        return "overlay"
    if value == "copy":
        return "copy"
    return "auto"


class NspawnHost:
    """One disposable Debian host (a systemd-nspawn container).

    ``__enter__`` makes the private rootfs (overlay over the cached rootfs, or a
    copy); files can be put in before :meth:`start`.  ``__exit__`` calls :meth:`stop`.
    """

    def __init__(
        self,
        rootfs: Path,
        *,
        name: str | None = None,
        workdir: Path | None = None,
        mode: RootfsMode | None = None,
    ) -> None:
        self.base_rootfs = rootfs
        self.machine = name or f"dat-{secrets.token_hex(5)}"
        self.workdir_base = workdir or default_workdir()
        self.requested_mode: RootfsMode = mode or _env_rootfs_mode()
        self.mode: Literal["overlay", "copy"] | None = None
        self.dir = self.workdir_base / self.machine
        self.root = self.dir / "rootfs"
        self.log_path = self.dir / "nspawn.log"
        self.systemd: bool | None = None
        self.boot_state: str | None = None
        self.timings: dict[str, float] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._leader: int | None = None
        self._cgroups: list[Path] = []
        self._prepared = False
        self._stopped = False

    # ---- lifecycle --------------------------------------------------------

    def __enter__(self) -> NspawnHost:
        self.prepare()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<NspawnHost {self.machine} pid={self._leader} root={self.root}>"

    def prepare(self) -> None:
        """Create the host's private rootfs (idempotent)."""
        if self._prepared:
            return
        t0 = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=False)
        try:
            self._write_state()
            mode = self.requested_mode
            if mode in ("auto", "overlay"):
                try:
                    self._mount_overlay()
                    self.mode = "overlay"
                except HostError:
                    if mode == "overlay":
                        raise
            if self.mode is None:
                subprocess.run(
                    [tool("cp"), "-a", "--reflink=auto", str(self.base_rootfs), str(self.root)],
                    check=True,
                    capture_output=True,
                )
                self.mode = "copy"
            (self.root / "etc/hostname").write_text(self.machine + "\n")
        except BaseException:
            safe_rmtree(self.dir)
            raise
        self._prepared = True
        self.timings["prepare"] = time.monotonic() - t0

    def _mount_overlay(self) -> None:
        if any(c in str(p) for p in (self.base_rootfs, self.dir) for c in ",:"):
            raise HostError("overlay mount options cannot carry paths with ',' or ':'")
        upper, work = self.dir / "upper", self.dir / "work"
        for d in (upper, work, self.root):
            d.mkdir()
        opts = f"lowerdir={self.base_rootfs},upperdir={upper},workdir={work}"
        res = subprocess.run(
            [tool("mount"), "-t", "overlay", "overlay", "-o", opts, str(self.root)],
            capture_output=True,
            check=False,
        )
        if res.returncode != 0:
            for d in (upper, work, self.root):
                shutil.rmtree(d, ignore_errors=True)
            raise HostError(f"overlay mount failed: {res.stderr.decode(errors='replace')}")

    def _write_state(self) -> None:
        state = {
            "owner": os.getpid(),
            "machine": self.machine,
            "nspawn": self._proc.pid if self._proc else None,
            "cgroups": [str(c) for c in self._cgroups],
        }
        (self.dir / "state.json").write_text(json.dumps(state))

    def start(self, systemd: bool = True, *, timeout: float = 120) -> None:
        """Boot the host.

        ``systemd=True``: ``systemd-nspawn -b``, waits until ``systemctl
        is-system-running`` says running/degraded.  ``systemd=False``: a container
        whose PID 1 is nspawn's stub init running ``sleep infinity``; no init system,
        no /run/systemd/system.
        """
        if self._proc is not None:
            raise HostError(f"{self.machine} already started")
        self.prepare()
        self.systemd = systemd
        t0 = time.monotonic()
        self._cgroups = make_cgroups(self.machine)
        argv = [
            tool("systemd-nspawn"),
            "--quiet",
            f"--directory={self.root}",
            f"--machine={self.machine}",
            "--register=no",
            "--keep-unit",
            "--console=read-only",
            "--resolv-conf=copy-host",
            "--setenv=SYSTEMD_COLORS=0",
        ]
        argv += ["--boot"] if systemd else ["--as-pid2", "/bin/sleep", "infinity"]
        cgroups = list(self._cgroups)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", INNER_PATH), "SYSTEMD_COLORS": "0"},
                start_new_session=True,
                preexec_fn=lambda: ensure_child_setup(cgroups),
            )
        self._write_state()
        deadline = t0 + timeout
        self._leader = self._wait_leader(deadline)
        if systemd:
            self._wait_running(deadline)
        else:
            self._poll(
                lambda: self.run(["true"], check=False, timeout=10).returncode == 0,
                deadline,
                "container to become enterable",
            )
        self.timings["boot"] = time.monotonic() - t0

    def _check_alive(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise HostError(
                f"systemd-nspawn for {self.machine} exited with {self._proc.returncode}:\n"
                + tail(self.log_path)
            )

    def _poll(self, ready: Callable[[], bool], deadline: float, what: str) -> None:
        while True:
            self._check_alive()
            if ready():
                return
            if time.monotonic() > deadline:
                raise HostError(
                    f"timed out waiting for {what} ({self.machine}):\n" + tail(self.log_path)
                )
            time.sleep(0.1)

    def _wait_leader(self, deadline: float) -> int:
        """PID (host view) of the container's PID 1: nspawn's child in a new PID ns.

        It counts as ready once it no longer runs nspawn's setup code, i.e. it has
        exec'd systemd or turned into the stub init: mounts and pivot_root are done.
        """
        assert self._proc is not None
        nspawn_pid = self._proc.pid
        found: list[int] = []

        want = "systemd" if self.systemd else "(sd-stubinit)"

        def ready() -> bool:
            for child in children(nspawn_pid):
                if same_ns(child, "pid") or comm(child) != want:
                    continue
                # --as-pid2: the stub init forks the payload after all setup.
                if self.systemd or children(child):
                    found.append(child)
                    return True
            return False

        self._poll(ready, deadline, "container PID 1")
        return found[0]

    def is_system_running(self) -> str:
        res = self.run(["systemctl", "is-system-running"], check=False, timeout=30)
        return res.stdout.decode(errors="replace").strip()

    def _wait_running(self, deadline: float) -> None:
        states: list[str] = []

        def ready() -> bool:
            state = self.is_system_running()
            states.append(state)
            if state in ("maintenance", "stopping"):
                raise HostError(f"{self.machine} boot failed: {state}\n" + self.debug_report())
            return state in ("running", "degraded")

        self._poll(ready, deadline, "systemctl is-system-running")
        self.boot_state = states[-1]

    @property
    def pid(self) -> int:
        """Host PID of the container's PID 1 (inner systemd or stub init)."""
        if self._leader is None:
            raise HostError(f"{self.machine} is not running")
        return self._leader

    @property
    def cgroups(self) -> list[Path]:
        """The host-side cgroup dirs this container was started in (one per hierarchy)."""
        return list(self._cgroups)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 30) -> None:
        """Shut the host down (orderly, then SIGKILL), then delete its scratch dir.

        Idempotent and bounded: at most ``timeout`` for the orderly shutdown plus a
        few seconds for the kill.  Killing the container's PID 1 tears down its
        whole PID namespace, so nothing started inside (or via :meth:`run`) survives.
        """
        if self._stopped:
            return
        self._stopped = True
        t0 = time.monotonic()
        errors: list[str] = []
        proc = self._proc
        if proc is not None and proc.poll() is None:
            # SIGTERM makes nspawn send SIGRTMIN+3 (halt) to a booted systemd; in
            # --as-pid2 mode the stub init terminates the payload.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                warnings.warn(
                    f"{self.machine}: orderly shutdown took > {timeout}s; killing it",
                    stacklevel=2,
                )
        if proc is not None and proc.poll() is None and self._leader is not None:
            # Killing the container's PID 1 kills its whole PID namespace.  nspawn
            # then reaps it and exits by itself.  (Only while nspawn is unreaped,
            # so the PID cannot have been recycled.)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._leader, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if proc is not None and proc.poll() is None:
            # Last resort: nspawn's process group.  Its payload has PDEATHSIG=SIGKILL,
            # but would then be reaped by the host's init (slowly, on this machine).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                errors.append(f"systemd-nspawn pid {proc.pid} did not die")
        if self._leader is not None:
            self._wait_gone(self._leader, 10)
        self.timings["stop"] = time.monotonic() - t0
        for cg in self._cgroups:
            remove_cgroup_tree(cg)
        remove_nspawn_runtime_dirs(self.machine)
        try:
            if os.environ.get("DEVPI_AGENT_TEST_KEEP") == "1":
                umount_all(self.dir)
            else:
                safe_rmtree(self.dir)
        except (HostError, OSError) as exc:
            errors.append(f"cleanup of {self.dir}: {exc}")
        self.timings["stop_total"] = time.monotonic() - t0
        if errors:
            raise HostError(f"{self.machine}: " + "; ".join(errors))

    def reboot(self, timeout: float = 120) -> None:
        """Restart the host as a machine restarts: an orderly shutdown (services are stopped by
        the inner systemd), then a fresh boot on the same rootfs. Files on disk stay; /run,
        /tmp and every process do not. The scratch dir and the overlay mount are kept."""
        proc = self._proc
        if proc is None or self._stopped or proc.poll() is not None:
            raise HostError(f"{self.machine} is not running")
        systemd = bool(self.systemd)
        t0 = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise HostError(
                f"{self.machine}: orderly shutdown took more than {timeout}s:\n"
                + tail(self.log_path)
            ) from None
        if self._leader is not None:
            self._wait_gone(self._leader, 10)
        for cg in self._cgroups:
            remove_cgroup_tree(cg)
        remove_nspawn_runtime_dirs(self.machine)
        self._proc = None
        self._leader = None
        self._cgroups = []
        self.timings["shutdown"] = time.monotonic() - t0
        self.start(systemd=systemd, timeout=timeout)

    @staticmethod
    def _wait_gone(pid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    # ---- interaction ------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = True,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` inside the host as root (``nsenter -t PID -a``).

        The environment is clean: ``PATH=/usr/sbin:/usr/bin:/sbin:/bin``,
        ``HOME=/root``, plus ``env``.  stdout/stderr are captured (bytes).  On
        timeout the whole nsenter process group is killed and TimeoutExpired raised.
        """
        __tracebackhide__ = True  # pytest: show the caller's line, not this frame
        full_env = {"PATH": INNER_PATH, "HOME": "/root"}
        if env:
            full_env.update(env)
        cmd = [tool("nsenter"), "-t", str(self.pid), "-a", "--", *argv]
        with subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd="/",
            start_new_session=True,
        ) as proc:
            try:
                out, err = proc.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_nsenter_group(proc)
                # Bounded: a process that escaped the kill would hold the pipes open forever.
                out, err = proc.communicate(timeout=30)
                raise subprocess.TimeoutExpired(list(argv), timeout, out, err) from None
        res = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
        if check and res.returncode != 0:
            raise HostCommandError(res.returncode, list(argv), out, err)
        return res

    def output(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 600,
    ) -> str:
        """``run(argv, check=True)`` and return stdout as stripped text."""
        __tracebackhide__ = True
        res = self.run(argv, input=input, env=env, check=True, timeout=timeout)
        return res.stdout.decode(errors="replace").strip()

    def path(self, p: str) -> Path:
        """Host path of ``p`` in the host's on-disk rootfs (valid before start too).

        Paths under the container's own tmpfs/API mounts (/run, /tmp, /dev, /proc,
        /sys) are refused: they are not on disk, use :meth:`read` / :meth:`run`.
        Symlinks are NOT resolved container-relative: an absolute symlink inside
        points into the real host.
        """
        rel = os.path.normpath("/" + p.lstrip("/"))
        for volatile in VOLATILE_MOUNTS:
            if rel == volatile or rel.startswith(volatile + "/"):
                raise ValueError(
                    f"{p} is on a tmpfs/API mount inside the container ({volatile}), "
                    "not in the rootfs dir; use host.read()/host.run()"
                )
        return self.root / rel.lstrip("/")

    def read(self, p: str) -> bytes:
        """Content of ``p`` as seen by the running container (any mount)."""
        return self.run(["cat", "--", p], timeout=60).stdout

    def write(self, dest: str, data: bytes | str, mode: int = 0o644) -> Path:
        """Create ``dest`` inside the host (parents as needed, owned by root)."""
        target = self.path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.encode() if isinstance(data, str) else data)
        os.chown(target, 0, 0)
        target.chmod(mode)
        return target

    def copy_in(self, src: Path, dest: str, mode: int = 0o644) -> Path:
        """Copy host file ``src`` to ``dest`` inside the host with ``mode``."""
        return self.write(dest, src.read_bytes(), mode)

    # ---- debugging --------------------------------------------------------

    def logs(self) -> str:
        """systemd-nspawn's output: the container console (boot messages)."""
        return tail(self.log_path, 200_000) if self.log_path.exists() else ""

    def journal(self, unit: str | None = None, lines: int = 300) -> str:
        """``journalctl`` output inside the host (whole journal or one unit)."""
        if not self.running or not self.systemd:
            return "<no journal: host not running systemd>"
        argv = ["journalctl", "--no-pager", "-o", "short-precise", "-n", str(lines)]
        if unit:
            argv += ["-u", unit]
        try:
            res = self.run(argv, check=False, timeout=30)
        except (subprocess.TimeoutExpired, HostError) as exc:
            return f"<journalctl failed: {exc}>"
        return (res.stdout + res.stderr).decode(errors="replace")

    def debug_report(self) -> str:
        """Everything useful after a failure: console log tail, failed units, journal."""
        parts = [f"===== host {self.machine} ({self.mode}, root={self.root}) ====="]
        parts.append("----- nspawn console (tail) -----\n" + self.logs()[-8000:])
        if self.running and self.systemd:
            try:
                failed = self.run(["systemctl", "--failed", "--no-pager"], check=False, timeout=30)
                parts.append("----- failed units -----\n" + failed.stdout.decode(errors="replace"))
            except (subprocess.TimeoutExpired, HostError) as exc:
                parts.append(f"<systemctl --failed: {exc}>")
            parts.append("----- journal (tail) -----\n" + self.journal(lines=200))
        return "\n".join(parts)


class HostFactory(Protocol):
    def __call__(self, *, systemd: bool = True, start: bool = True) -> NspawnHost: ...


# --------------------------------------------------------------------------- stale cleanup


def cleanup_stale(workdir: Path | None = None) -> list[str]:
    """Remove hosts left behind by test processes that died (SIGKILL, OOM, ...).

    Only touches dirs under the harness workdir whose owner PID is gone; kills a
    leftover nspawn only if its command line carries that host's machine name.
    Returns the machine names cleaned up.
    """
    base = workdir or default_workdir()
    cleaned: list[str] = []
    if not base.is_dir():
        return cleaned
    for d in base.iterdir():
        state_file = d / "state.json"
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        owner = state.get("owner")
        if isinstance(owner, int) and pid_alive(owner):
            continue
        machine = str(state.get("machine", d.name))
        nspawn = state.get("nspawn")
        if isinstance(nspawn, int) and f"--machine={machine}" in cmdline(nspawn):
            for child in children(nspawn):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(nspawn, signal.SIGKILL)
            NspawnHost._wait_gone(nspawn, 10)
        for cg in state.get("cgroups", []):
            remove_cgroup_tree(Path(cg))
        remove_nspawn_runtime_dirs(machine)
        try:
            safe_rmtree(d)
        except (HostError, OSError):
            continue
        cleaned.append(machine)
    return cleaned


@contextlib.contextmanager
def running_host(
    rootfs: Path, *, systemd: bool = True, mode: RootfsMode | None = None
) -> Iterator[NspawnHost]:
    """Convenience: a started host that is always stopped."""
    with NspawnHost(rootfs, mode=mode) as h:
        h.start(systemd=systemd)
        yield h
