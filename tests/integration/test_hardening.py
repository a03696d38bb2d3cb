"""Attacks across the host boundary (issue #12): one host converged with an HTTP proxy set.

- http_proxy/https_proxy point at a recording forwarding proxy on this machine's loopback (every
  nspawn host shares this machine's network, so it is reachable from inside). apt and pip go
  through it (apt's archive, PyPI); the agent's calls to devpi on loopback must not: nothing
  addressed to 127.0.0.1, localhost or devpi's port, and no password byte, may reach it.
- `devpi-agent restore` of an export holding a link to /etc/shadow is refused naming the entry,
  with nothing copied.
- The basic-auth memo's key is root's alone.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import select
import socket
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agenthost import AGENT, CONFIG, DIST, USER_PASSWORD, ApplyRun, Ports, apply, config_text
from nspawn import NspawnHost, free_port

ROOT_PASSWORD_FILE = "/etc/devpi-agent/root.pass"
BACKUP_DIR = "/var/backups/devpi"
DEVPI_HOME = "/var/lib/devpi"
MEMO_KEY = "/var/lib/devpi-agent/basic-auth.memo-key"
LOOPBACK_NAMES = ("127.", "localhost", "[::1]", "::1")


class RecordingProxy:
    """A small HTTP proxy: CONNECT tunnels and absolute-URI requests are forwarded, and every
    byte a client sends it (request lines, headers, bodies, tunnelled bytes) is recorded."""

    def __init__(self) -> None:
        self.port = free_port()
        self.request_lines: list[str] = []
        self.received = bytearray()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.close()
        self._thread.join(timeout=10)

    def _record(self, data: bytes) -> None:
        with self._lock:
            self.received += data

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with contextlib.closing(client):
            client.settimeout(120)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    self._record(head)
                    return
                head += chunk
            self._record(head)
            header, _, rest = head.partition(b"\r\n\r\n")
            lines = header.decode("latin-1").split("\r\n")
            with self._lock:
                self.request_lines.append(lines[0])
            method, target, _version = ([*lines[0].split(" "), "", "", ""])[:3]
            try:
                if method == "CONNECT":
                    host, _, port = target.rpartition(":")
                    upstream = socket.create_connection((host.strip("[]"), int(port)), 30)
                    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    if rest:
                        upstream.sendall(rest)
                    self._splice(client, upstream)
                else:
                    self._forward(client, method, target, lines[1:], rest)
            except OSError:
                with contextlib.suppress(OSError):
                    client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")

    def _forward(
        self, client: socket.socket, method: str, target: str, headers: list[str], body: bytes
    ) -> None:
        match = re.match(r"http://(\[[^\]]+\]|[^/:]+)(?::(\d+))?(/.*)?$", target)
        if not match:
            client.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            return
        host, port, path = match[1].strip("[]"), int(match[2] or 80), match[3] or "/"
        length = next(
            (int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")),
            0,
        )
        while len(body) < length:
            chunk = client.recv(65536)
            if not chunk:
                break
            self._record(chunk)
            body += chunk
        kept = [
            h
            for h in headers
            if h and not h.lower().startswith(("connection:", "proxy-connection:", "keep-alive:"))
        ]
        request = "\r\n".join([f"{method} {path} HTTP/1.1", *kept, "Connection: close", "", ""])
        with socket.create_connection((host, port), 30) as upstream:
            upstream.sendall(request.encode("latin-1") + body)
            while chunk := upstream.recv(65536):
                client.sendall(chunk)

    def _splice(self, client: socket.socket, upstream: socket.socket) -> None:
        with contextlib.closing(upstream):
            sockets = [client, upstream]
            while True:
                ready, _, _ = select.select(sockets, [], [], 120)
                if not ready:
                    return
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        self._record(data)
                        upstream.sendall(data)
                    else:
                        client.sendall(data)


@dataclass
class ProxiedHost:
    host: NspawnHost
    ports: Ports
    proxy: RecordingProxy
    env: dict[str, str]
    first: ApplyRun
    second: ApplyRun

    def agent(self, *args: str) -> tuple[int, str]:
        run = self.host.run(["env", "-u", "HOME", AGENT, *args], env=self.env, check=False)
        return run.returncode, run.stdout.decode(errors="replace") + run.stderr.decode(
            errors="replace"
        )


@pytest.fixture(scope="module")
def proxied(rootfs: Path) -> Iterator[ProxiedHost]:
    assert DIST.exists(), f"{DIST} is missing: run `make dist` first"
    ports = Ports.free()
    host = NspawnHost(rootfs)
    with RecordingProxy() as proxy:
        env = {"http_proxy": proxy.url, "https_proxy": proxy.url}
        try:
            host.prepare()
            host.copy_in(DIST, AGENT, mode=0o755)
            host.write(CONFIG, config_text(ports), mode=0o600)
            host.start(systemd=True)
            first = apply(host, env=env)
            second = apply(host, env=env)
            yield ProxiedHost(host, ports, proxy, env, first, second)
        except BaseException:
            print(host.debug_report())
            raise
        finally:
            host.stop()


def test_apply_converges_through_a_proxy(proxied: ProxiedHost) -> None:
    for run in (proxied.first, proxied.second):
        assert run.returncode == 0, run.stderr[-5000:]
    assert proxied.second.report["changed"] == 0, proxied.second.report
    lines = proxied.proxy.request_lines
    # The proxy was used where it should be: apt's archive and PyPI went through it.
    assert any("deb.debian.org" in line for line in lines), lines
    assert any(line.startswith("CONNECT ") and "pypi" in line for line in lines), lines


def test_no_devpi_call_and_no_password_reaches_the_proxy(proxied: ProxiedHost) -> None:
    """The attack: with http_proxy set, urllib's default opener sent the agent's devpi calls
    on loopback, /+login with root's password and users' passwords in PUT/PATCH bodies, to the
    proxy in clear text."""
    lines = proxied.proxy.request_lines
    devpi_port = f":{proxied.ports.devpi}"
    to_loopback = [
        line
        for line in lines
        if any(name in ([*line.split(" "), "", ""])[1] for name in LOOPBACK_NAMES)
        or devpi_port in line
    ]
    assert to_loopback == [], to_loopback
    root_password = proxied.host.read(ROOT_PASSWORD_FILE).decode().strip()
    received = bytes(proxied.proxy.received)
    for password in (USER_PASSWORD, root_password):
        for form in (password.encode(), base64.b64encode(password.encode())):
            assert form not in received, f"a password reached the proxy ({len(received)} bytes)"


def test_restore_refuses_an_export_linking_to_etc_shadow(proxied: ProxiedHost) -> None:
    """The attack: an export holding a link to /etc/shadow, root-only so that restore copies it
    for the service user: the copy followed the link and chowned /etc/shadow's bytes to devpi."""
    host = proxied.host
    code, output = proxied.agent("backup", "--json")
    assert code == 0, output
    [backup] = sorted(os.listdir(host.path(BACKUP_DIR)))
    host.run(["cp", "-a", f"{BACKUP_DIR}/{backup}", "/root/poisoned"])
    host.run(["chown", "-R", "root:root", "/root/poisoned"])
    host.run(["chmod", "-R", "go-rwx", "/root/poisoned"])
    host.run(["ln", "-s", "/etc/shadow", "/root/poisoned/shadow"])
    nodeinfo = host.read(f"{DEVPI_HOME}/server/.nodeinfo")
    before = sorted(os.listdir(host.path(DEVPI_HOME)))

    code, output = proxied.agent("restore", "/root/poisoned")
    assert code != 0, output
    assert "shadow" in output and "symlink" in output and "refused" in output, output[-3000:]
    assert sorted(os.listdir(host.path(DEVPI_HOME))) == before
    assert host.read(f"{DEVPI_HOME}/server/.nodeinfo") == nodeinfo
    shadow = host.read("/etc/shadow")
    for directory, _, files in os.walk(host.path(DEVPI_HOME)):
        for name in files:
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink():
                assert path.read_bytes() != shadow, f"{path} holds /etc/shadow's bytes"


def test_memo_key_is_root_only(proxied: ProxiedHost) -> None:
    st = proxied.host.path(MEMO_KEY).stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
