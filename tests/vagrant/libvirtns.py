"""libvirt in a network and mount namespace of the test's own, for one Vagrant run.

    with LibvirtNamespace(workdir) as ns:
        ns.run(["vagrant", "up", "--provider=libvirt"], cwd=..., env=...)
        with ns.entered():       # this thread's sockets and children: the namespace's network
            urllib.request.urlopen("https://localhost:8443/...")

- The namespace is held by one process (`unshare --net --mount`) that bind-mounts private, empty
  state directories over libvirt's (/run/libvirt, /var/lib/libvirt, /var/log/libvirt,
  /var/cache/libvirt), a copy of /etc/libvirt (qemu runs as root, no cgroups, no per-domain
  mount namespaces; no autostarted network) and a resolv.conf naming slirp4netns's resolver.
  This machine's libvirt state (if any) is never seen, let alone changed.
- Its way out is slirp4netns (10.0.2.100 behind a user-mode NAT; --disable-host-loopback: the
  namespace cannot reach this machine's own 127.0.0.1). libvirt's NAT network (vagrant-libvirt's
  management network) lives inside the namespace; so do Vagrant's forwarded port (127.0.0.1
  there) and the test's clients: no traffic goes to an address of this machine's networks.
- virtlogd and libvirtd are started in it by this class and stopped by their pids; the holder
  and slirp4netns too. A test process that dies takes them along (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
_CLONE_NEWNET = 0x40000000
STATE_DIRS = ("/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt")
REQUIRED_TOOLS = (
    "unshare",
    "nsenter",
    "slirp4netns",
    "libvirtd",
    "virtlogd",
    "virsh",
    "dnsmasq",
    "iptables",
    "ip",
)
QEMU_CONF = """\
# devpi-agent's Vagrant tests: one throwaway libvirtd in the test's own namespaces.
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
"""


class LibvirtError(RuntimeError):
    """The namespace or a daemon in it did not come up."""


def _die_with_parent() -> None:
    _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _stop(proc: subprocess.Popen[bytes] | None, name: str) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        print(f"{name} (pid {proc.pid}) ignored SIGTERM: killed")
        proc.kill()
        proc.wait(timeout=30)


class LibvirtNamespace:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.holder: subprocess.Popen[bytes] | None = None
        self.slirp: subprocess.Popen[bytes] | None = None
        self.virtlogd: subprocess.Popen[bytes] | None = None
        self.libvirtd: subprocess.Popen[bytes] | None = None
        self.netns = ""  # the namespace's identity (net:[inode]), kept after it is gone

    # ---- inside ----------------------------------------------------------------------

    def _nsenter(self) -> list[str]:
        assert self.holder is not None
        return ["nsenter", f"--target={self.holder.pid}", "--net", "--mount"]

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the namespace (network and mounts), output captured."""
        # nsenter --mount starts in / unless told otherwise.
        wd = [f"--wd={cwd}"] if cwd is not None else []
        result = subprocess.run(
            [*self._nsenter(), *wd, "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        if check and result.returncode != 0:
            raise LibvirtError(
                f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def virsh(self, *args: str) -> str:
        return self.run(["virsh", "-c", "qemu:///system", *args], timeout=120, check=True).stdout

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """This thread in the namespace's network (its new sockets and the children it starts)."""
        assert self.holder is not None
        with (
            open("/proc/thread-self/ns/net") as mine,
            open(f"/proc/{self.holder.pid}/ns/net") as theirs,
        ):
            if _LIBC.setns(theirs.fileno(), _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the test's network namespace")
            try:
                yield
            finally:
                if _LIBC.setns(mine.fileno(), _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back")

    # ---- lifecycle -------------------------------------------------------------------

    def _prepare(self) -> str:
        missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
        if missing:
            raise LibvirtError(
                f"missing {', '.join(missing)} (tools/install-prereqs.sh installs them)"
            )
        etc = self.dir / "etc-libvirt"
        shutil.copytree("/etc/libvirt", etc, symlinks=True)
        (etc / "qemu.conf").write_text(QEMU_CONF)
        for autostart in (etc / "qemu" / "networks" / "autostart").glob("*"):
            autostart.unlink()
        (self.dir / "resolv.conf").write_text("nameserver 10.0.2.3\n")
        binds = [(str(etc), "/etc/libvirt"), (str(self.dir / "resolv.conf"), "/etc/resolv.conf")]
        for path in STATE_DIRS:
            private = self.dir / ("state" + path.replace("/", "-"))
            private.mkdir()
            binds.append((str(private), path))
        lines = ["set -e", "ip link set lo up"]
        for source, target in binds:
            lines.append(f"mkdir -p {target} && mount --bind {source} {target}")
        lines.append("exec sleep infinity")
        return "\n".join(lines)

    def _wait(
        self, what: str, ready: object, timeout: float, proc: subprocess.Popen[bytes]
    ) -> None:
        deadline = time.monotonic() + timeout
        while not (ready() if callable(ready) else ready):
            if proc.poll() is not None:
                raise LibvirtError(f"{what} exited {proc.returncode}; log:\n{self.log_tail(what)}")
            if time.monotonic() > deadline:
                raise LibvirtError(f"{what} not ready after {timeout}s:\n{self.log_tail(what)}")
            time.sleep(0.2)

    def log_tail(self, name: str, chars: int = 4000) -> str:
        try:
            return (self.dir / f"{name}.log").read_bytes()[-chars:].decode(errors="replace")
        except OSError as error:
            return f"<{error}>"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=open(self.dir / f"{name}.log", "ab"),
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )

    def start(self) -> None:
        script = self._prepare()
        self.holder = self._spawn(
            "holder",
            ["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", script],
        )
        holder = self.holder
        self._wait("holder", lambda: _has_child_sleep(holder.pid), 30, holder)
        self.netns = os.readlink(f"/proc/{holder.pid}/ns/net")
        self.slirp = self._spawn(
            "slirp4netns",
            [
                "slirp4netns",
                "--configure",
                "--mtu=65520",
                "--disable-host-loopback",
                str(holder.pid),
                "tap0",
            ],
        )
        self._wait("slirp4netns", lambda: self._has_default_route(), 30, self.slirp)
        self.virtlogd = self._spawn("virtlogd", [*self._nsenter(), "--", "virtlogd"])
        self._wait(
            "virtlogd", (self.dir / "state-run-libvirt" / "virtlogd-sock").exists, 30, self.virtlogd
        )
        self.libvirtd = self._spawn("libvirtd", [*self._nsenter(), "--", "libvirtd"])
        sock = self.dir / "state-run-libvirt" / "libvirt-sock"
        self._wait("libvirtd", sock.exists, 60, self.libvirtd)
        deadline = time.monotonic() + 60
        while self.run(["virsh", "-c", "qemu:///system", "version"], timeout=60).returncode:
            if time.monotonic() > deadline or self.libvirtd.poll() is not None:
                raise LibvirtError(f"libvirtd does not answer:\n{self.log_tail('libvirtd')}")
            time.sleep(0.5)

    def _has_default_route(self) -> bool:
        result = self.run(["ip", "route", "show", "default"], timeout=30)
        return "tap0" in result.stdout

    def stop(self) -> None:
        _stop(self.libvirtd, "libvirtd")
        _stop(self.virtlogd, "virtlogd")
        # Whatever libvirt started in the namespace (qemu, dnsmasq) and outlived it.
        for pid in self._pids_in_namespace():
            with contextlib.suppress(ProcessLookupError):
                print(f"left in the namespace: pid {pid} {_cmdline(pid)}: killed")
                os.kill(pid, signal.SIGKILL)
        _stop(self.slirp, "slirp4netns")
        _stop(self.holder, "holder")

    def _pids_in_namespace(self) -> list[int]:
        if not self.netns:
            return []
        holder = self.holder.pid if self.holder is not None else -1
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == holder:
                continue
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "net") == self.netns:
                    pids.append(int(entry.name))
        return pids

    def leftovers(self) -> list[str]:
        """Processes in the namespace besides its holder (after stop: none, the holder neither)."""
        return [f"{pid} {_cmdline(pid)}" for pid in self._pids_in_namespace()]

    def __enter__(self) -> LibvirtNamespace:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def _has_child_sleep(pid: int) -> bool:
    # The holder has exec'd `sleep infinity` once its mounts are in place.
    return _cmdline(pid).startswith("sleep")
