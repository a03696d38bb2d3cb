"""The agent's calls to devpi never go through an HTTP proxy (issue #12, item 2).

A fake devpi and a recording "proxy" on loopback, http_proxy/https_proxy pointing at the proxy:
every call must reach devpi directly and the proxy must get nothing.
"""

from __future__ import annotations

import http.server
import json
import re
import socket
import threading
from collections.abc import Iterator

import pytest
from conftest import REPO_ROOT

from agent.host import replication
from agent.host import supervisor as host_supervisor
from agent.host.devpi_api import DevpiApi


class _Devpi(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = json.dumps(
            {"result": {"password": "token", "serial": 3, "role": "PRIMARY"}}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def devpi_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Devpi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """A listener that records what reaches it and answers 502, like a proxy that cannot reach
    the target; the proxy variables point at it and no_proxy is unset."""
    received: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"

    def serve() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with client:
                client.settimeout(5)
                try:
                    received.append(client.recv(65536))
                    client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, url)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    yield received
    listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close alone does not
    listener.close()
    thread.join(timeout=5)


def test_devpi_calls_with_passwords_skip_the_proxy(devpi_port: int, proxy: list[bytes]) -> None:
    """The attack: root's /+login and a user's PUT body went to the proxy in clear text."""
    api = DevpiApi(devpi_port, timeout=5)
    assert api.login("root", "root-secret-pw") is True
    api.create_user("alice", "alice-secret-pw")
    api.set_password("alice", "alice-new-pw")
    assert proxy == []


def test_readiness_and_status_polls_skip_the_proxy(devpi_port: int, proxy: list[bytes]) -> None:
    assert host_supervisor.devpi_api_answers(devpi_port) is True
    assert replication.devpi_status(devpi_port, timeout=5)["serial"] == 3
    assert proxy == []


def test_the_proxy_is_still_there_for_what_needs_it(proxy: list[bytes]) -> None:
    """The variables are left alone: apt, pip and Caddy's key download use them."""
    import urllib.request

    assert urllib.request.getproxies()["http"].startswith("http://127.0.0.1:")


def test_every_urllib_call_in_the_agent_goes_through_the_helper() -> None:
    """One helper, not copies: urllib's own openers are used only where a proxy is wanted."""
    # core/download.py: Caddy's key and uv from the web (through a proxy if one is set).
    allowed = {"agent/core/direct_http.py", "agent/core/download.py"}
    pattern = re.compile(r"urlopen\(|build_opener\(|HTTPSHandler\(|ProxyHandler\(|OpenerDirector")
    found = []
    for path in sorted((REPO_ROOT / "agent").rglob("*.py")):
        relative = str(path.relative_to(REPO_ROOT))
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and "direct_http.urlopen(" not in line:
                found.append(f"{relative}:{number}: {line.strip()}")
    unexpected = [f for f in found if f.split(":")[0] not in allowed]
    assert unexpected == []
    assert any(f.startswith("agent/core/download.py") for f in found)
