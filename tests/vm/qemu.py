"""A throwaway qemu VM (TCG: KVM is not usable here) booted from the cached image, with a NoCloud
seed, guest ports forwarded to 127.0.0.1 only, and qemu-guest-agent as the test's way in.

    vm = VM(image, workdir, seed, forwards={8443: 8443})
    vm.start()
    vm.wait_cloud_init(timeout=900)
    result = vm.exec("cloud-init status --long")
    vm.reboot()
    vm.stop()
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from vmimage import Image

QEMU = "qemu-system-x86_64"
REQUIRED_TOOLS: tuple[str, ...] = (QEMU, "cloud-localds")
GUEST_AGENT_PORT = "org.qemu.guest_agent.0"
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


class VMError(RuntimeError):
    """The VM did not boot, answer or stop as expected."""


@dataclass(frozen=True)
class ExecResult:
    returncode: int
    stdout: str
    stderr: str


def make_seed(directory: Path, user_data: str, instance_id: str) -> Path:
    """A NoCloud seed disk (label cidata) holding the user data under test."""
    (directory / "user-data").write_text(user_data)
    (directory / "user-data").chmod(0o600)
    (directory / "meta-data").write_text(f"instance-id: {instance_id}\nlocal-hostname: devpi-vm\n")
    seed = directory / "seed.img"
    subprocess.run(
        ["cloud-localds", str(seed), str(directory / "user-data"), str(directory / "meta-data")],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return seed


def _die_with_parent() -> None:
    # If the test process dies, the VM goes with it.
    _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


class VM:
    def __init__(
        self,
        image: Image,
        workdir: Path,
        seed: Path,
        *,
        forwards: dict[int, int],
        cpus: int = 2,
        memory_mib: int = 2048,
    ) -> None:
        self.image = image
        self.dir = workdir
        self.seed = seed
        self.forwards = forwards
        self.cpus = cpus
        self.memory_mib = memory_mib
        self.disk = workdir / "disk.raw"
        self.console = workdir / "console.log"
        self.qga_socket = workdir / "qga.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def argv(self) -> list[str]:
        hostfwd = "".join(
            f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in self.forwards.items()
        )
        return [
            QEMU,
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            str(self.cpus),
            "-m",
            str(self.memory_mib),
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            f"file:{self.console}",
            "-kernel",
            str(self.image.kernel),
            "-initrd",
            str(self.image.initrd),
            "-append",
            "root=/dev/vda rw console=ttyS0 panic=-1",
            "-drive",
            f"file={self.disk},if=virtio,format=raw,cache=unsafe,discard=unmap",
            "-drive",
            f"file={self.seed},if=virtio,format=raw,readonly=on",
            "-netdev",
            f"user,id=net0{hostfwd}",
            "-device",
            "virtio-net-pci,netdev=net0",
            "-chardev",
            f"socket,id=qga0,path={self.qga_socket},server=on,wait=off",
            "-device",
            "virtio-serial",
            "-device",
            f"virtserialport,chardev=qga0,name={GUEST_AGENT_PORT}",
        ]

    def start(self) -> None:
        """First start copies the cached disk (sparse); the seed makes it a new instance."""
        for tool in REQUIRED_TOOLS:
            if shutil.which(tool) is None:
                raise VMError(
                    f"{tool} not found (apt-get install qemu-system-x86 cloud-image-utils)"
                )
        if not self.disk.exists():
            subprocess.run(
                ["cp", "--sparse=always", "--reflink=auto", str(self.image.disk), str(self.disk)],
                check=True,
                timeout=300,
            )
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=open(self.dir / "qemu.log", "ab"),  # noqa: SIM115 - owned by the child
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def console_tail(self, chars: int = 8000) -> str:
        try:
            return self.console.read_bytes()[-chars:].decode(errors="replace")
        except OSError as error:
            return f"<no console log: {error}>"

    # ---- qemu-guest-agent -------------------------------------------------------------

    def _qga(self, command: str, arguments: dict[str, object] | None, timeout: float) -> object:
        if not self.running:
            raise VMError(f"qemu is not running; console:\n{self.console_tail()}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.qga_socket))
            # Resynchronise first: an earlier client may have left a reply unread.
            sync_id = secrets.randbelow(2**31)
            request = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
            sock.sendall(b"\xff" + json.dumps(request).encode() + b"\n")
            buffer = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    raise VMError("guest agent closed the connection")
                buffer += chunk
                if b"\xff" in buffer:
                    buffer = buffer[buffer.rindex(b"\xff") + 1 :]
                    lines = buffer.split(b"\n")
                    if any(_returns(line, sync_id) for line in lines[:-1]):
                        buffer = b""
                        break
            message: dict[str, object] = {"execute": command}
            if arguments is not None:
                message["arguments"] = arguments
            sock.sendall(json.dumps(message).encode() + b"\n")
            while b"\n" not in buffer:
                chunk = sock.recv(65536)
                if not chunk:
                    raise VMError("guest agent closed the connection")
                buffer += chunk
        reply = json.loads(buffer.split(b"\n", 1)[0])
        if "error" in reply:
            raise VMError(f"guest agent: {command}: {reply['error']}")
        return reply.get("return")

    def agent_alive(self) -> bool:
        try:
            self._qga("guest-ping", None, timeout=3)
        except (OSError, VMError):
            return False
        return True

    def exec(self, command: str, *, timeout: float = 120) -> ExecResult:
        """Run a shell command in the guest as root (through the guest agent)."""
        started = self._qga(
            "guest-exec",
            {"path": "/bin/sh", "arg": ["-c", command], "capture-output": True},
            timeout=30,
        )
        assert isinstance(started, dict)
        pid = started["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self._qga("guest-exec-status", {"pid": pid}, timeout=30)
            assert isinstance(status, dict)
            if status.get("exited"):
                return ExecResult(
                    int(status.get("exitcode", -1)),
                    _b64(status.get("out-data")),
                    _b64(status.get("err-data")),
                )
            if time.monotonic() > deadline:
                raise VMError(f"guest command timed out after {timeout}s: {command}")
            time.sleep(0.5)

    def output(self, command: str, *, timeout: float = 120) -> str:
        result = self.exec(command, timeout=timeout)
        if result.returncode != 0:
            raise VMError(f"{command} exited {result.returncode}: {result.stderr}{result.stdout}")
        return result.stdout

    def read(self, path: str) -> str:
        return self.output(f"cat {path}")

    # ---- lifecycle --------------------------------------------------------------------

    def wait_agent(self, timeout: float) -> float:
        """Seconds since qemu started when the guest agent first answered."""
        deadline = time.monotonic() + timeout
        while not self.agent_alive():
            if time.monotonic() > deadline:
                raise VMError(f"no guest agent after {timeout}s; console:\n{self.console_tail()}")
            time.sleep(2)
        return time.monotonic() - self.started_at

    def wait_cloud_init(self, timeout: float) -> float:
        """Wait (bounded) until this boot's cloud-init finished (its result.json is written);
        return the seconds since qemu started."""
        deadline = time.monotonic() + timeout
        self.wait_agent(timeout)
        while True:
            with contextlib.suppress(VMError, OSError):
                if self.exec("test -e /run/cloud-init/result.json", timeout=30).returncode == 0:
                    return time.monotonic() - self.started_at
            if time.monotonic() > deadline:
                raise VMError(
                    f"cloud-init not finished after {timeout}s; console:\n{self.console_tail()}"
                )
            time.sleep(3)

    def boot_id(self) -> str:
        return self.read("/proc/sys/kernel/random/boot_id").strip()

    def reboot(self, timeout: float = 600) -> float:
        """An orderly reboot of the guest; returns seconds until its cloud-init finished again."""
        before = self.boot_id()
        with contextlib.suppress(VMError, OSError):
            # The agent does not answer a reboot it is carrying out.
            self._qga("guest-shutdown", {"mode": "reboot"}, timeout=5)
        self.started_at = time.monotonic()
        deadline = self.started_at + timeout
        while True:
            with contextlib.suppress(VMError, OSError):
                if self.agent_alive() and self.boot_id() != before:
                    break
            if time.monotonic() > deadline:
                raise VMError(f"no reboot after {timeout}s; console:\n{self.console_tail()}")
            time.sleep(2)
        return self.wait_cloud_init(max(1.0, deadline - time.monotonic()))

    def stop(self) -> None:
        """Pull the plug: the disk is thrown away, an orderly shutdown would only cost time."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _returns(line: bytes, sync_id: int) -> bool:
    try:
        return bool(json.loads(line).get("return") == sync_id)
    except ValueError:
        return False


def _b64(data: object) -> str:
    if not isinstance(data, str):
        return ""
    return base64.b64decode(data).decode(errors="replace")


def remove_workdir(path: Path) -> None:
    if os.environ.get("DEVPI_AGENT_TEST_KEEP") != "1":
        shutil.rmtree(path, ignore_errors=True)
