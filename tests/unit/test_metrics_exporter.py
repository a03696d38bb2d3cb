"""The metrics exporter's exposition: names, values from the records and devpi's /+status, the
Caddy pass-through, no secrets; the step that installs or removes its supervisor program."""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import FakeRunner, make_ctx, reference_data

from agent.commands import metrics as exporter
from agent.commands import verify
from agent.core.config import Config, ConfigError, parse
from agent.core.paths import METRICS_PROGRAM
from agent.steps import metrics as metrics_step

PASSWORD = "s3cret-Passw0rd"
NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
CADDY_TEXT = (
    "# HELP caddy_http_requests_total Counter of HTTP(S) requests made.\n"
    "# TYPE caddy_http_requests_total counter\n"
    'caddy_http_requests_total{handler="reverse_proxy",server="srv0"} 7\n'
    "# HELP go_goroutines Number of goroutines that currently exist.\n"
    "# TYPE go_goroutines gauge\n"
    "go_goroutines 12\n"
)


class FakeDevpi(BaseHTTPRequestHandler):
    status: ClassVar[dict[str, Any]] = {}

    def do_GET(self) -> None:
        body = json.dumps({"type": "status", "result": self.status}).encode()
        self.send_response(200 if self.path == "/+status" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def devpi() -> Iterator[tuple[int, type[FakeDevpi]]]:
    handler = type("Handler", (FakeDevpi,), {"status": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()


def config(port: int, **metrics: Any) -> Config:
    data = reference_data()
    data["users"] = [{"name": "devops", "password": PASSWORD}]
    data["devpi"] = {"port": port, "home": "/var/lib/devpi"}
    data["metrics"] = {"enabled": True, **metrics}
    return parse(data)


def write_record(root: Path, name: str, record: dict[str, Any]) -> None:
    path = root / "var/lib/devpi-agent/status" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def collector(root: Path, cfg: Config, **kwargs: Any) -> exporter.Collector:
    kwargs.setdefault("caddy_get", lambda path: CADDY_TEXT)
    kwargs.setdefault("cert_validity", lambda: (1_890_000_000.0, 1_900_000_000.0))
    return exporter.Collector(cfg, root=root, **kwargs)


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def test_exposition_names_values_and_no_secrets(tmp_path: Path, devpi: Any) -> None:
    port, handler = devpi
    handler.status = {
        "role": "REPLICA",
        "serial": 40,
        "master-serial": 52,
        "event-serial": 39,
        "last-commit-timestamp": 1_800_000_000.5,
        "serverdir": "/var/lib/devpi/server",
        "uuid": "deadbeef",
        "replication-errors": {},
        "metrics": [
            ["devpi_server_storage_cache_hits", "counter", 11],
            ["devpi_web_whoosh_index_queue_size", "gauge", 3],
            ["bad name!", "gauge", 1],
            ["devpi_server_text", "gauge", "not a number"],
        ],
    }
    files = tmp_path / "var/lib/devpi/server/+files/a"
    files.mkdir(parents=True)
    (files / "pkg-1.0.tar.gz").write_bytes(b"x" * 1000)
    (files / "pkg-1.0-py3-none-any.whl").write_bytes(b"y" * 234)
    write_record(
        tmp_path,
        "backup",
        {
            "ok": True,
            "finished": 1_800_000_100.0,
            "bytes": 5555,
            "files": 2,
            "seconds": 1.5,
            "path": "/var/backups/devpi/x",
        },
    )
    write_record(tmp_path, "remote-backup", {"ok": True, "finished": 1_800_000_200.0, "bytes": 777})
    write_record(
        tmp_path,
        "apply",
        {
            "ok": False,
            "finished": 1_800_000_300.0,
            "changed": 2,
            "failed_step": "caddy",
            "seconds": 9.25,
        },
    )
    text = collector(tmp_path, config(port, backup_max_age=3600)).collect()
    got = samples(text)
    assert got["devpi_up"] == 1
    assert got["devpi_serial"] == 40
    assert got["devpi_primary_serial"] == 52
    assert got["devpi_replica_serial_lag"] == 12
    assert got["devpi_server_storage_cache_hits_total"] == 11
    assert got["devpi_web_whoosh_index_queue_size"] == 3
    assert got["devpi_files_bytes"] == 1234
    assert got["devpi_files"] == 2
    assert got["devpi_disk_free_bytes"] > 0
    assert got["devpi_certificate_expiry_timestamp_seconds"] == 1_900_000_000
    assert got["devpi_certificate_not_before_timestamp_seconds"] == 1_890_000_000
    assert got["devpi_backup_ok"] == 1
    assert got["devpi_backup_last_success_timestamp_seconds"] == 1_800_000_100
    assert got["devpi_backup_size_bytes"] == 5555
    assert got["devpi_backup_max_age_seconds"] == 3600
    assert got["devpi_remote_backup_ok"] == 1
    assert got["devpi_remote_backup_last_success_timestamp_seconds"] == 1_800_000_200
    assert got["devpi_apply_ok"] == 0
    assert got["devpi_apply_last_run_timestamp_seconds"] == 1_800_000_300
    assert got['caddy_http_requests_total{handler="reverse_proxy",server="srv0"}'] == 7
    assert got["caddy_go_goroutines"] == 12
    assert "go_goroutines" not in got
    # Each family once, valid names, and nothing of the config's secrets or paths.
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            assert NAME.fullmatch(line.split()[2])
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    for secret in (PASSWORD, "devops", "deadbeef", "/var/lib/devpi", 'caddy"', "bad name"):
        assert secret not in text


def test_absent_records_and_down_devpi(tmp_path: Path) -> None:
    def no_caddy(path: str) -> str:
        raise OSError("no socket")

    def no_cert() -> tuple[float, float]:
        raise OSError("refused")

    text = collector(tmp_path, config(1), caddy_get=no_caddy, cert_validity=no_cert).collect()
    got = samples(text)
    assert got["devpi_up"] == 0
    assert got["devpi_caddy_metrics_up"] == 0
    assert got["devpi_certificate_ok"] == 0
    for absent in ("devpi_backup_ok", "devpi_remote_backup_ok", "devpi_apply_ok", "devpi_serial"):
        assert absent not in got


def test_failed_backup_keeps_no_success_time(tmp_path: Path) -> None:
    write_record(tmp_path, "backup", {"ok": False, "finished": 1_800_000_000.0, "error": "disk"})
    got = samples(collector(tmp_path, config(1)).collect())
    assert got["devpi_backup_ok"] == 0
    assert "devpi_backup_last_success_timestamp_seconds" not in got


def test_files_walk_is_cached(tmp_path: Path) -> None:
    now = [1000.0]
    files = tmp_path / "var/lib/devpi/server/+files"
    files.mkdir(parents=True)
    (files / "a").write_bytes(b"a" * 10)
    c = collector(tmp_path, config(1, files_scan_interval=300), clock=lambda: now[0])
    assert samples(c.collect())["devpi_files_bytes"] == 10
    (files / "b").write_bytes(b"b" * 5)
    now[0] += 299
    assert samples(c.collect())["devpi_files_bytes"] == 10
    now[0] += 1
    assert samples(c.collect())["devpi_files_bytes"] == 15


def test_http_server_serves_text_format(tmp_path: Path) -> None:
    c = collector(tmp_path, config(1))
    server = exporter.make_server(c, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.headers["Content-Type"] == exporter.CONTENT_TYPE
            assert b"devpi_up 0" in response.read()
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
        assert error.value.code == 404
        assert verify.exporter_answers(f"127.0.0.1:{port}")
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("metrics", "key"),
    [
        ({"listen": "0.0.0.0"}, "metrics.listen"),
        ({"listen": "pypi.example.com:9449"}, "metrics.listen"),
        ({"listen": "127.0.0.1:70000"}, "metrics.listen"),
        ({"listen": "127.0.0.1:443"}, "metrics.listen"),
        ({"backup_max_age": 0}, "metrics.backup_max_age"),
        ({"files_scan_interval": -1}, "metrics.files_scan_interval"),
        ({"enabled": "yes"}, "metrics.enabled"),
        ({"colour": 1}, "metrics.colour"),
    ],
)
def test_bad_metrics_config_names_the_key(metrics: dict[str, Any], key: str) -> None:
    data = reference_data()
    data["metrics"] = {"enabled": True, **metrics}
    with pytest.raises(ConfigError) as error:
        parse(data)
    assert error.value.key == key


def test_metrics_defaults() -> None:
    cfg = parse(reference_data()).metrics
    assert (cfg.enabled, cfg.listen, cfg.backup_max_age, cfg.files_scan_interval) == (
        False,
        "127.0.0.1:9449",
        93600,
        300,
    )
    assert parse({**reference_data(), "metrics": {"listen": "[::1]:9500"}}).metrics.listen


def test_step_writes_program_when_on_and_removes_it_when_off(tmp_path: Path) -> None:
    data = reference_data()
    data["metrics"] = {"enabled": True}
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, parse(data), runner, check=True)
    metrics_step.converge(ctx)
    program = tmp_path / "etc/supervisor/conf.d" / f"{METRICS_PROGRAM}.conf"
    assert not program.exists()  # plan changes nothing
    content = metrics_step.program_content(ctx)
    assert "metrics serve --config /etc/devpi-agent/config.toml" in content
    assert PASSWORD not in content
    program.parent.mkdir(parents=True)
    program.write_text(content)
    off = make_ctx(tmp_path, parse(reference_data()), runner)
    metrics_step.converge(off)
    assert not program.exists()
    assert any("update" in call.argv for call in runner.calls)


def test_verify_reports_the_exporter_only_when_on() -> None:
    on = {**reference_data(), "metrics": {"enabled": True}}
    assert "metrics" in dict(verify.checks_for(parse(on)))
    assert "metrics" not in dict(verify.checks_for(parse(reference_data())))
    assert not verify.metrics_verdict("RUNNING", False, "127.0.0.1:9449").ok
    assert not verify.metrics_verdict(None, True, "127.0.0.1:9449").ok
    assert verify.metrics_verdict("RUNNING", True, "127.0.0.1:9449").ok


def test_a_changed_setting_changes_the_program_file(tmp_path: Path) -> None:
    """The exporter reads the config once, at its start: a changed setting it uses must change
    its program file (supervisor's `update` then restarts it); a changed password must not."""

    def content(**metrics: Any) -> str:
        data = reference_data()
        data["metrics"] = {"enabled": True, **metrics}
        return metrics_step.program_content(make_ctx(tmp_path, parse(data), FakeRunner()))

    assert content() == content()
    assert content(backup_max_age=7200) != content()
    assert content(listen="127.0.0.1:9500") != content()
    data = reference_data()
    data["metrics"] = {"enabled": True}
    data["users"][0]["password"] = "another-Password-1"
    assert metrics_step.program_content(make_ctx(tmp_path, parse(data), FakeRunner())) == content()


def test_apply_writes_its_status_record(tmp_path: Path) -> None:
    """apply.json: ok, changed, the failed step and seconds, which the exporter turns into
    devpi_apply_ok and friends."""
    from agent.commands.converge import record_apply
    from agent.core.engine import RunReport, StepReport
    from agent.core.files import Files
    from agent.core.status import read_status

    files = Files(root=tmp_path, chown=False)
    steps = [StepReport("apt", "ok", 1.0), StepReport("tls", "changed", 2.0)]
    record_apply(files, RunReport(steps=steps, skipped=[], seconds=3.5, file_changes=[]))
    record = read_status(files, "apply")
    assert record is not None
    assert (record["ok"], record["changed"], record["failed_step"]) == (True, 1, None)
    failing = [*steps, StepReport("caddy", "failed", 0.5, error="boom")]
    record_apply(files, RunReport(steps=failing, skipped=["backup"], seconds=4.0, file_changes=[]))
    record = read_status(files, "apply")
    assert record is not None
    assert (record["ok"], record["failed_step"], record["seconds"]) == (False, "caddy", 4.0)
    got = samples(collector(tmp_path, config(1)).collect())
    assert got["devpi_apply_ok"] == 0
    assert got["devpi_apply_changed_steps"] == 1
