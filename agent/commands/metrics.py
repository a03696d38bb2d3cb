"""`devpi-agent metrics serve`: a Prometheus exporter (text format 0.0.4) on `[metrics] listen`.

Run by supervisor as the program devpi-agent-metrics when `metrics.enabled` (agent/steps/
metrics.py). Each scrape reads what it reports there and then: devpi's /+status on loopback, the
status records (backup.json, remote-backup.json, apply.json), the certificate Caddy serves, free
disk, and Caddy's own metrics from its admin API (passed through, caddy_* and go/process series
renamed caddy_go_*/caddy_process_* so they do not clash with the exporter's own). The walk of
devpi's +files is cached for `metrics.files_scan_interval` seconds.

Nothing exported carries a password, a token, a user name or a path.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import click

from agent.commands.support import EXIT_CONFIG, config_option
from agent.core import direct_http
from agent.core.config import Config, ConfigError, admin_socket, load, metrics_address
from agent.core.status import status_path
from agent.host.x509 import parse_der

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
HTTP_TIMEOUT = 5.0


@dataclass
class Exposition:
    """Series in Prometheus' text format, one HELP and TYPE per family."""

    lines: list[str] = field(default_factory=list)
    families: set[str] = field(default_factory=set)

    def add(
        self, name: str, value: float, help_text: str, kind: str = "gauge", **labels: str
    ) -> None:
        if not _NAME.fullmatch(name):
            return
        if name not in self.families:
            self.families.add(name)
            self.lines.append(f"# HELP {name} {help_text}")
            self.lines.append(f"# TYPE {name} {kind}")
        label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
        series = f"{name}{{{label_text}}}" if label_text else name
        self.lines.append(f"{series} {_number(value)}")

    def extend_raw(self, text: str) -> None:
        self.lines.extend(line for line in text.splitlines() if line.strip())

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (Caddy's admin API)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def caddy_admin_get(admin: str, path: str, timeout: float = HTTP_TIMEOUT) -> str:
    """GET `path` from Caddy's admin API at `admin` (unix//path or host:port)."""
    socket_path = admin_socket(admin)
    connection: http.client.HTTPConnection
    if socket_path is not None:
        connection = UnixHTTPConnection(str(socket_path), timeout)
        # Caddy allows an empty Host on its unix socket and refuses a name (403).
        connection.putrequest("GET", path, skip_host=True)
        connection.putheader("Host", "")
    else:
        host, _, port = admin.rpartition(":")
        connection = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
        connection.putrequest("GET", path)
    try:
        connection.endheaders()
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise OSError(f"Caddy's admin API answered {response.status}")
        return body.decode("utf-8", "replace")
    finally:
        connection.close()


def caddy_passthrough(text: str) -> str:
    """Caddy's exposition with its Go runtime and process series renamed caddy_go_* and
    caddy_process_* (the exporter's own process is not Caddy's)."""
    out = []
    for line in text.splitlines():
        for prefix in ("go_", "process_", "promhttp_"):
            if line.startswith(prefix):
                line = "caddy_" + line
            elif line.startswith(("# HELP " + prefix, "# TYPE " + prefix)):
                line = line[:7] + "caddy_" + line[7:]
        out.append(line)
    return "\n".join(out)


def certificate_validity(
    host: str, port: int, server_name: str, timeout: float
) -> tuple[float, float]:
    """notBefore and notAfter (epoch seconds) of the certificate served on host:port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError(f"{host}:{port} presented no certificate")
    leaf = parse_der(der)
    return leaf.not_before.timestamp(), leaf.not_after.timestamp()


@dataclass
class FilesScan:
    at: float = -math.inf
    total: int = 0
    count: int = 0


def walk_size(root: Path) -> tuple[int, int]:
    """Bytes and number of files under root (no symlinks followed)."""
    total = count = 0
    for directory, _, names in os.walk(root):
        for name in names:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
                count += 1
            except OSError:
                continue
    return total, count


class Collector:
    """Everything one scrape reports; `root` prefixes the host's paths (tests)."""

    def __init__(
        self,
        config: Config,
        *,
        root: Path = Path("/"),
        clock: Callable[[], float] = time.time,
        caddy_get: Callable[[str], str] | None = None,
        cert_validity: Callable[[], tuple[float, float]] | None = None,
    ) -> None:
        self.config = config
        self.root = root
        self.clock = clock
        self.caddy_get = caddy_get or (lambda p: caddy_admin_get(config.server.caddy_admin, p))
        self.cert_validity = cert_validity or self._served_certificate
        self.scan = FilesScan()
        self.lock = threading.Lock()

    def host(self, path: Path) -> Path:
        return self.root / path.relative_to("/")

    def _served_certificate(self) -> tuple[float, float]:
        server = self.config.server
        return certificate_validity("127.0.0.1", server.https_port, server.domain, HTTP_TIMEOUT)

    def collect(self) -> str:
        out = Exposition()
        started = time.monotonic()
        self._devpi(out)
        self._disk(out)
        self._certificate(out)
        self._backup(out)
        self._remote_backup(out)
        self._apply(out)
        caddy_ok = self._caddy_up(out)
        out.add(
            "devpi_exporter_scrape_duration_seconds",
            round(time.monotonic() - started, 6),
            "Seconds this scrape took, Caddy's metrics excluded.",
        )
        if caddy_ok is not None:
            out.extend_raw(caddy_ok)
        return out.text()

    def _devpi_status(self) -> dict[str, Any] | None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.config.devpi.port}/+status",
            headers={"Accept": "application/json"},
        )
        try:
            with direct_http.urlopen(request, timeout=HTTP_TIMEOUT) as response:
                data = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None
        result = data.get("result") if isinstance(data, dict) else None
        return result if isinstance(result, dict) else None

    def _devpi(self, out: Exposition) -> None:
        status = self._devpi_status()
        out.add("devpi_up", 1 if status else 0, "1 if devpi-server answers /+status.")
        if not status:
            return
        serial = _as_number(status.get("serial"))
        if serial is not None:
            out.add("devpi_serial", serial, "devpi-server's current serial.")
        event_serial = _as_number(status.get("event-serial"))
        if event_serial is not None:
            out.add("devpi_event_serial", event_serial, "Serial whose events were processed.")
        commit = _as_number(status.get("last-commit-timestamp"))
        if commit is not None:
            out.add("devpi_last_commit_timestamp_seconds", commit, "Time of devpi's last commit.")
        role = str(status.get("role", "")).upper()
        out.add("devpi_replica", 1 if role == "REPLICA" else 0, "1 on a replica.")
        primary = _as_number(status.get("master-serial", status.get("primary-serial")))
        if role == "REPLICA" and primary is not None and serial is not None:
            out.add(
                "devpi_primary_serial", primary, "The primary's serial as the replica knows it."
            )
            out.add(
                "devpi_replica_serial_lag",
                max(primary - serial, 0),
                "Serials the replica is behind its primary.",
            )
        elif role != "REPLICA" and serial is not None:
            out.add("devpi_primary_serial", serial, "The primary's serial (this server's).")
        errors = status.get("replication-errors")
        if isinstance(errors, dict) and role == "REPLICA":
            out.add("devpi_replication_errors", len(errors), "Files the replica failed to fetch.")
        for item in status.get("metrics") or ():
            if not isinstance(item, (list, tuple)) or len(item) != 3:
                continue
            name, kind, value = item
            number = _as_number(value)
            if not isinstance(name, str) or not _NAME.fullmatch(name) or number is None:
                continue
            if not name.startswith("devpi"):
                name = f"devpi_{name}"
            kind = "counter" if kind == "counter" else "gauge"
            if kind == "counter" and not name.endswith("_total"):
                name = f"{name}_total"
            out.add(name, number, "From devpi-server's devpiserver_metrics hook.", kind)

    def _disk(self, out: Exposition) -> None:
        files_dir = self.host(self.config.devpi.serverdir / "+files")
        interval = self.config.metrics.files_scan_interval
        with self.lock:
            now = self.clock()
            if now - self.scan.at >= interval:
                total, count = walk_size(files_dir) if files_dir.is_dir() else (0, 0)
                self.scan = FilesScan(at=now, total=total, count=count)
            scan = self.scan
        out.add("devpi_files_bytes", scan.total, "Bytes of devpi's +files (cached walk).")
        out.add("devpi_files", scan.count, "Files in devpi's +files (cached walk).")
        out.add("devpi_files_scan_timestamp_seconds", scan.at, "When +files was last walked.")
        home = self.host(self.config.devpi.home)
        try:
            stat = os.statvfs(home if home.exists() else self.root)
        except OSError:
            return
        out.add(
            "devpi_disk_free_bytes",
            stat.f_bavail * stat.f_frsize,
            "Bytes free to devpi on the file system of devpi.home.",
        )
        out.add(
            "devpi_disk_size_bytes",
            stat.f_blocks * stat.f_frsize,
            "Size of the file system of devpi.home.",
        )

    def _certificate(self, out: Exposition) -> None:
        try:
            not_before, expiry = self.cert_validity()
        except (OSError, ValueError, ssl.SSLError):
            out.add("devpi_certificate_ok", 0, "1 if the served certificate could be read.")
            return
        out.add("devpi_certificate_ok", 1, "1 if the served certificate could be read.")
        out.add(
            "devpi_certificate_expiry_timestamp_seconds",
            expiry,
            "notAfter of the certificate Caddy serves for server.domain.",
        )
        out.add(
            "devpi_certificate_not_before_timestamp_seconds",
            not_before,
            "notBefore of the certificate Caddy serves (with notAfter: its lifetime).",
        )

    def _record(self, name: str) -> dict[str, Any] | None:
        try:
            record = json.loads(self.host(status_path(name)).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _backup(self, out: Exposition) -> None:
        out.add(
            "devpi_backup_max_age_seconds",
            self.config.metrics.backup_max_age,
            "metrics.backup_max_age: older than this, the last good backup is too old.",
        )
        out.add("devpi_backup_enabled", 1 if self.config.backup.enabled else 0, "backup.enabled.")
        record = self._record("backup")
        if record is None:
            return
        ok = record.get("ok") is True
        out.add("devpi_backup_ok", 1 if ok else 0, "1 if the last backup succeeded.")
        finished = _as_number(record.get("finished"))
        if finished is not None:
            out.add("devpi_backup_last_run_timestamp_seconds", finished, "End of the last backup.")
        if ok and finished is not None:
            out.add(
                "devpi_backup_last_success_timestamp_seconds",
                finished,
                "End of the last good backup.",
            )
        for key, name, text in (
            ("bytes", "devpi_backup_size_bytes", "Bytes of the last good backup."),
            ("files", "devpi_backup_files", "Files in the last good backup."),
            ("seconds", "devpi_backup_duration_seconds", "Seconds the last backup took."),
        ):
            number = _as_number(record.get(key))
            if ok and number is not None:
                out.add(name, number, text)

    def _remote_backup(self, out: Exposition) -> None:
        record = self._record("remote-backup")
        if record is None:
            return
        ok = record.get("ok") is True
        out.add("devpi_remote_backup_ok", 1 if ok else 0, "1 if the last remote backup succeeded.")
        finished = _as_number(record.get("finished"))
        if ok and finished is not None:
            out.add(
                "devpi_remote_backup_last_success_timestamp_seconds",
                finished,
                "End of the last good remote backup.",
            )
        size = _as_number(record.get("bytes"))
        if ok and size is not None:
            out.add("devpi_remote_backup_size_bytes", size, "Bytes of the last remote backup.")

    def _apply(self, out: Exposition) -> None:
        record = self._record("apply")
        if record is None:
            return
        ok = record.get("ok") is True
        out.add("devpi_apply_ok", 1 if ok else 0, "1 if the last apply succeeded.")
        finished = _as_number(record.get("finished"))
        if finished is not None:
            out.add("devpi_apply_last_run_timestamp_seconds", finished, "End of the last apply.")
        for key, name, text in (
            ("changed", "devpi_apply_changed_steps", "Steps the last apply changed."),
            ("seconds", "devpi_apply_duration_seconds", "Seconds the last apply took."),
        ):
            number = _as_number(record.get(key))
            if number is not None:
                out.add(name, number, text)

    def _caddy_up(self, out: Exposition) -> str | None:
        try:
            text = self.caddy_get("/metrics")
        except (OSError, http.client.HTTPException):
            out.add("devpi_caddy_metrics_up", 0, "1 if Caddy's admin API gave its metrics.")
            return None
        out.add("devpi_caddy_metrics_up", 1, "1 if Caddy's admin API gave its metrics.")
        return caddy_passthrough(text)


def make_server(collector: Collector, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        server_version = "devpi-agent-metrics"
        sys_version = ""

        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = collector.collect().encode()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

    return Server((host, port), Handler)


@click.group()
def metrics() -> None:
    """The Prometheus exporter ([metrics] in the config)."""


@metrics.command()
@config_option
def serve(config_path: Path) -> None:
    """Answer Prometheus' scrapes on metrics.listen (supervisor runs this)."""
    try:
        config = load(config_path)
    except ConfigError as error:
        click.echo(f"devpi-agent: invalid config: {error}", err=True)
        raise SystemExit(EXIT_CONFIG) from None
    host, port = metrics_address(config.metrics.listen)
    server = make_server(Collector(config), host, port)
    click.echo(f"devpi-agent metrics: listening on {config.metrics.listen}", err=True)
    server.serve_forever()


@metrics.command()
@config_option
def show(config_path: Path) -> None:
    """Print one scrape to stdout."""
    try:
        config = load(config_path)
    except ConfigError as error:
        click.echo(f"devpi-agent: invalid config: {error}", err=True)
        raise SystemExit(EXIT_CONFIG) from None
    click.echo(Collector(config).collect(), nl=False)


def family_names(text: str) -> Iterable[str]:
    """The series names of an exposition (tests, verify)."""
    for line in text.splitlines():
        if line and not line.startswith("#"):
            yield re.split(r"[{ ]", line, maxsplit=1)[0]
