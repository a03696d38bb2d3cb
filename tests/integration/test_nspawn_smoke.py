"""Smoke tests for the nspawn test-host harness itself."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import nspawn
import pytest
from nspawn import HostCommandError, HostFactory, NspawnHost, free_port

pytestmark = pytest.mark.integration

RecordProperty = Callable[[str, object], None]

PYPI_FETCH = (
    "import urllib.request\n"
    "with urllib.request.urlopen('https://pypi.org/simple/pip/', timeout=60) as r:\n"
    "    body = r.read()\n"
    "    print(r.status, len(body))\n"
)


def _timings(host: NspawnHost, record_property: RecordProperty) -> None:
    for key, value in host.timings.items():
        record_property(f"{host.machine}.{key}", round(value, 3))
    print(host.machine, {k: round(v, 2) for k, v in host.timings.items()})


def _container_processes(host: NspawnHost) -> list[str]:
    """``comm`` of every process (zombies included) in the host's PID namespace."""
    pid_ns = os.readlink(f"/proc/{host.pid}/ns/pid")
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns/pid") == pid_ns:
                    found.append((entry / "comm").read_text().strip())
            except OSError:
                pass
    return found


def test_systemd_host(make_host: HostFactory, record_property: RecordProperty) -> None:
    host = make_host()
    _timings(host, record_property)

    assert host.boot_state in ("running", "degraded")
    assert host.is_system_running() in ("running", "degraded")
    assert host.output(["cat", "/proc/1/comm"]) == "systemd"
    assert host.run(["test", "-d", "/run/systemd/system"], check=False).returncode == 0
    with pytest.raises(ValueError, match="tmpfs"):
        host.path("/run/systemd/system")
    assert b"ID=debian" in host.read("/etc/os-release")
    assert host.output(["hostname"]) == host.machine
    assert len(host.output(["cat", "/etc/machine-id"])) == 32
    assert host.output(["getent", "hosts", "localhost"])
    assert host.output(["python3", "-c", "import sys; print(sys.version_info[0])"]) == "3"
    # Clean environment: only PATH, HOME and what the caller passes.
    env = host.output(["env"], env={"FOO": "bar"}).splitlines()
    assert sorted(env) == sorted(["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "FOO=bar"])
    # stdin and failures.
    assert host.output(["cat"], input=b"hello\n") == "hello"
    with pytest.raises(HostCommandError, match="exit status 3"):
        host.run(["sh", "-c", "echo oops >&2; exit 3"])
    assert host.run(["false"], check=False).returncode == 1

    # Files in and out.
    src = host.dir / "payload.txt"
    src.write_text("payload\n")
    host.copy_in(src, "/opt/test/payload.txt", 0o600)
    assert host.output(["stat", "-c", "%a %U", "/opt/test/payload.txt"]) == "600 root"
    host.run(["sh", "-c", "echo from-inside > /root/out.txt"])
    assert host.path("/root/out.txt").read_text() == "from-inside\n"

    # Shared network namespace: a service inside is reachable on host loopback.
    port = free_port()
    server = ["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    host.run(["systemd-run", "--unit=smoke-web", "--", *server, "--directory", "/opt/test"])
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/payload.txt", timeout=5) as r:
                assert r.read() == b"payload\n"
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert "smoke-web" in host.journal("smoke-web")

    # HTTPS to PyPI with the CA certs baked into the rootfs.
    assert host.output(["python3", "-c", PYPI_FETCH]).startswith("200 ")

    # mmdebstrap leaves /var/lib/apt/lists empty (only "lock" and "partial/"):
    # whoever installs packages must run apt-get update first.
    assert sorted(p.name for p in host.path("/var/lib/apt/lists").iterdir()) == [
        "lock",
        "partial",
    ]
    # apt works after an update: mirror + DNS (+ the security suite).
    t0 = time.monotonic()
    host.run(["apt-get", "update"], timeout=300)
    host.run(
        ["apt-get", "install", "-y", "--no-install-recommends", "hello"],
        env={"DEBIAN_FRONTEND": "noninteractive"},
        timeout=300,
    )
    assert host.output(["hello"]) == "Hello, world!"
    print(f"apt-get update + install hello: {time.monotonic() - t0:.1f}s")

    # A run() timeout kills the command inside (and its children), not only
    # nsenter, and leaves no zombie behind (one would delay shutdown by 10 s).
    with pytest.raises(subprocess.TimeoutExpired):
        host.run(["sh", "-c", "sleep 4242; true"], timeout=1)
    assert not {"sh", "sleep"} & set(_container_processes(host))


def test_a_timeout_kills_children_forked_while_the_kill_runs(make_host: HostFactory) -> None:
    """A command still forking when its timeout hits leaves nothing behind.

    CI once found a ``sleep`` alive after ``sh -c 'sleep 4242; true'`` timed out: under
    load, sh forked it just after the kill had listed the process group. This shell forks
    without pause, so a kill that lists the group once always misses some children."""
    host = make_host()
    forker = "while :; do sleep 4242 & sleep 0.002; done"
    for _ in range(3):
        with pytest.raises(subprocess.TimeoutExpired):
            host.run(["sh", "-c", forker], timeout=1)
        assert not {"sh", "sleep"} & set(_container_processes(host))


def test_free_ports_come_once_per_lap_below_the_kernels_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CI once had two hosts' Caddys on one port (SO_REUSEPORT lets the second bind), twine
    reaching the wrong one. A port is handed out once per lap of this worker's block, never from
    the range the kernel picks ports in, and never while something listens on it."""
    block = nspawn._PORTS_FROM + nspawn._port_block() * nspawn._PORTS_PER_BLOCK
    low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    # Fresh turns (the others' untouched): the first port the block gives is the one held.
    monkeypatch.setattr(nspawn, "_port_turns", itertools.count())
    held = free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", held))
        listener.listen()
        monkeypatch.setattr(nspawn, "_port_turns", itertools.count())
        ports = [free_port() for _ in range(200)]  # less than a lap: live hosts hold some
    assert len(set(ports)) == len(ports)
    assert held not in ports
    assert all(block <= port < block + nspawn._PORTS_PER_BLOCK for port in ports)
    assert not [port for port in ports if low <= port <= high]


def test_host_without_systemd(make_host: HostFactory, record_property: RecordProperty) -> None:
    host = make_host(systemd=False)
    _timings(host, record_property)

    assert host.output(["cat", "/proc/1/comm"]) != "systemd"
    assert host.run(["test", "-e", "/run/systemd/system"], check=False).returncode != 0
    assert host.run(["systemctl", "is-system-running"], check=False).returncode != 0
    assert host.output(["python3", "-c", "print(42)"]) == "42"
    assert host.output(["python3", "-c", PYPI_FETCH]).startswith("200 ")


def test_hosts_are_isolated_and_stop_cleanly(
    make_host: HostFactory, record_property: RecordProperty
) -> None:
    a, b = make_host(), make_host()
    assert a.machine != b.machine
    assert a.output(["cat", "/etc/machine-id"]) != b.output(["cat", "/etc/machine-id"])
    a.write("/root/only-a", "a")
    assert b.run(["test", "-e", "/root/only-a"], check=False).returncode == 1
    # Each inner systemd has a cgroup tree of its own, not a shared ".../payload"
    # where both journalds would sit in one systemd-journald.service cgroup.
    unit = "payload/system.slice/systemd-journald.service/cgroup.procs"
    procs_a = {p for cg in a.cgroups for p in (cg / unit).read_text().split()}
    procs_b = {p for cg in b.cgroups for p in (cg / unit).read_text().split()}
    assert procs_a and procs_b and not procs_a & procs_b

    leader, nspawn_dir = a.pid, a.dir
    a.stop()
    _timings(a, record_property)
    assert not Path(f"/proc/{leader}").exists()
    assert not nspawn_dir.exists()
    assert b.is_system_running() in ("running", "degraded")
    a.stop()  # idempotent


def test_prepare_then_start(make_host: HostFactory) -> None:
    host = make_host(start=False)
    host.write("/etc/devpi-test-marker", "x\n", 0o640)
    host.start(systemd=False)
    assert host.output(["cat", "/etc/devpi-test-marker"]) == "x"
