"""Read supervisord's state over its XML-RPC unix socket, without starting a supervisorctl.

Each supervisorctl is a Python start-up (~150 ms); a no-op apply asks several times.
"""

from __future__ import annotations

import configparser
import http.client
import socket
import xmlrpc.client
from pathlib import Path
from typing import Any

DEFAULT_SOCKET = "/var/run/supervisor.sock"


def socket_path(supervisord_conf: Path) -> str:
    """The [unix_http_server] file= of supervisord's config (Debian: /var/run/supervisor.sock)."""
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"), strict=False)
    try:
        parser.read(supervisord_conf)
    except configparser.Error:
        return DEFAULT_SOCKET
    return parser.get("unix_http_server", "file", fallback=DEFAULT_SOCKET)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__()
        self.unix_path = path
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        return _UnixConnection(self.unix_path, self.timeout)


def _proxy(supervisord_conf: Path, timeout: float) -> Any:
    transport = _UnixTransport(socket_path(supervisord_conf), timeout)
    return xmlrpc.client.ServerProxy("http://localhost/RPC2", transport=transport)


def supervisord_pid(supervisord_conf: Path, timeout: float = 10) -> int | None:
    try:
        return int(_proxy(supervisord_conf, timeout).supervisor.getPID())
    except (OSError, xmlrpc.client.Error, ValueError):
        return None


def process_state(supervisord_conf: Path, program: str, timeout: float = 10) -> str | None:
    """RUNNING, STARTING, BACKOFF, FATAL, STOPPED...; None if unknown or supervisord is down."""
    try:
        info = _proxy(supervisord_conf, timeout).supervisor.getProcessInfo(program)
    except (OSError, xmlrpc.client.Error):
        return None
    return str(info.get("statename")) if isinstance(info, dict) else None
