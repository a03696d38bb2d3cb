"""Metrics on a converged bookworm host, scraped by this machine's real Prometheus (Debian's,
started here with its own config and data directory on loopback, killed after).

Hosts share this machine's network, so the exporter's `listen` is a free loopback port the
Prometheus here reaches directly, as the other tests reach Caddy. The rules are the shipped file
with every `for:` set to 0s (the alerts' conditions are the shipped ones); two alerts fire for
real and clear: devpi stopped (DevpiDown) and the backup made old (DevpiBackupTooOld).

Figures (exporter RSS, CPU at 1 s scrapes, scrape time and size, alert latencies) are printed;
run with -s to see them.
"""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from agenthost import AGENT, CONFIG, DIST, USER_PASSWORD, Ports, apply, config_text
from nspawn import NspawnHost, free_port

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "units" / "prometheus-devpi-rules.yml"
STATUS_BACKUP = "/var/lib/devpi-agent/status/backup.json"
BACKUP_MAX_AGE = 3600


@dataclass
class Setup:
    host: NspawnHost
    ports: Ports
    metrics_port: int
    prometheus: str  # base URL


def wait_for(check: Callable[[], bool], timeout: float, what: str, step: float = 0.25) -> float:
    """Seconds until check() holds; fails after `timeout`."""
    started = time.monotonic()
    while True:
        if check():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(step)


def metrics_config(ports: Ports, metrics_port: int, enabled: bool = True) -> str:
    return (
        config_text(ports)
        + f"""
[metrics]
enabled = {"true" if enabled else "false"}
listen = "127.0.0.1:{metrics_port}"
backup_max_age = {BACKUP_MAX_AGE}
files_scan_interval = 5
"""
    )


def prometheus_api(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())["data"]


def firing(base: str) -> set[str]:
    alerts = prometheus_api(base, "/api/v1/alerts")["alerts"]
    return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


def value(base: str, query: str) -> float | None:
    result = prometheus_api(base, "/api/v1/query", query=query)["result"]
    return float(result[0]["value"][1]) if result else None


def scrape(port: int) -> tuple[bytes, float]:
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read()
    return body, time.monotonic() - started


@pytest.fixture(scope="module")
def setup(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    assert DIST.exists(), f"{DIST} is missing: run `make dist` first"
    prometheus_bin = shutil.which("prometheus")
    assert prometheus_bin, "prometheus is missing: install it (tools/install-prereqs.sh)"
    ports, metrics_port = Ports.free(), free_port()
    host = NspawnHost(rootfs)
    host.prepare()
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        host.copy_in(DIST, AGENT, mode=0o755)
        host.write(CONFIG, metrics_config(ports, metrics_port), mode=0o600)
        host.start(systemd=True)
        run = apply(host)
        assert run.returncode == 0, run.stdout + run.stderr
        again = apply(host)
        assert again.returncode == 0 and again.report["changed"] == 0, again.stdout
        backup = host.run([AGENT, "backup", "--config", CONFIG, "--json"], check=False)
        assert backup.returncode == 0, backup.stdout + backup.stderr

        work = tmp_path_factory.mktemp("prometheus")
        rules = yaml.safe_load(RULES.read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                rule["for"] = "0s"
        (work / "rules.yml").write_text(yaml.safe_dump(rules))
        (work / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(work / "rules.yml")],
                    "scrape_configs": [
                        {
                            "job_name": "devpi",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                        }
                    ],
                }
            )
        )
        web_port = free_port()
        log = (work / "prometheus.log").open("wb")
        prometheus = subprocess.Popen(
            [
                prometheus_bin,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{web_port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{web_port}"

        def ready() -> bool:
            assert prometheus is not None and prometheus.poll() is None, (
                work / "prometheus.log"
            ).read_text()
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_for(ready, 60, "Prometheus ready")
        yield Setup(host, ports, metrics_port, base)
    finally:
        if prometheus is not None:
            prometheus.kill()
            prometheus.wait(timeout=30)
        host.stop()


def test_prometheus_scrapes_the_series(setup: Setup) -> None:
    # One request through Caddy, for Caddy's request counter.
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        urllib.request.urlopen(f"https://127.0.0.1:{setup.ports.https}/+api", context=context)
    except urllib.error.HTTPError as error:
        assert error.code == 401
    wait_for(lambda: value(setup.prometheus, "devpi_up") == 1, 60, "devpi_up == 1 in Prometheus")
    wanted = {
        "devpi_up",
        "devpi_serial",
        "devpi_primary_serial",
        "devpi_files_bytes",
        "devpi_disk_free_bytes",
        "devpi_certificate_expiry_timestamp_seconds",
        "devpi_backup_ok",
        "devpi_backup_last_success_timestamp_seconds",
        "devpi_backup_size_bytes",
        "devpi_apply_ok",
        "devpi_apply_last_run_timestamp_seconds",
        "devpi_caddy_metrics_up",
        "caddy_http_requests_total",
    }

    def all_there() -> bool:
        names = set(prometheus_api(setup.prometheus, "/api/v1/label/__name__/values"))
        return wanted <= names

    wait_for(all_there, 30, f"series {sorted(wanted)}")
    assert value(setup.prometheus, "devpi_apply_ok") == 1
    assert value(setup.prometheus, "devpi_caddy_metrics_up") == 1
    expiry = value(setup.prometheus, "devpi_certificate_expiry_timestamp_seconds")
    assert expiry is not None and expiry > time.time()
    backup = value(setup.prometheus, "devpi_backup_size_bytes")
    assert backup is not None and backup > 0
    # No remote backup has run: its series are absent, not zero.
    assert value(setup.prometheus, "devpi_remote_backup_ok") is None
    assert not firing(setup.prometheus), firing(setup.prometheus)

    body, _ = scrape(setup.metrics_port)
    text = body.decode()
    assert USER_PASSWORD not in text
    assert not re.search(r"(?i)password|token|secret", text)
    timings = sorted(scrape(setup.metrics_port)[1] for _ in range(20))
    print(
        f"\nscrape: {len(body)} bytes, {len(text.splitlines())} lines, "
        f"{timings[0] * 1000:.0f}-{timings[-1] * 1000:.0f} ms (median {timings[10] * 1000:.0f})"
    )


def test_verify_reports_the_exporter(setup: Setup) -> None:
    result = setup.host.run([AGENT, "verify", "--config", CONFIG, "--json"], check=False)
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["metrics"]["ok"], checks["metrics"]


def test_exporter_cost(setup: Setup) -> None:
    pid = setup.host.output(["supervisorctl", "pid", "devpi-agent-metrics"]).strip()
    assert pid.isdigit(), pid

    def cpu_ticks() -> int:
        fields = setup.host.output(["cat", f"/proc/{pid}/stat"]).rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    before, started = cpu_ticks(), time.monotonic()
    time.sleep(20)  # Prometheus scrapes every second meanwhile: the cost being measured
    used = (cpu_ticks() - before) / 100 / (time.monotonic() - started)
    status = setup.host.output(["cat", f"/proc/{pid}/status"])
    rss_kib = int(re.search(r"VmRSS:\s+(\d+) kB", status)[1])  # type: ignore[index]
    print(
        f"\nexporter: RSS {rss_kib / 1024:.1f} MiB, CPU {used * 100:.2f} % of a core at 1 s scrapes"
    )
    assert rss_kib < 100 * 1024
    assert used < 0.05


def test_devpi_down_fires_and_clears(setup: Setup) -> None:
    wait_for(lambda: value(setup.prometheus, "devpi_up") == 1, 60, "devpi up")
    setup.host.run(["supervisorctl", "stop", "devpi-server"])
    try:
        fired = wait_for(lambda: "DevpiDown" in firing(setup.prometheus), 60, "DevpiDown fires")
    finally:
        started = time.monotonic()
        # Returns once devpi-server has run for supervisor's startsecs (5 s).
        setup.host.run(["supervisorctl", "start", "devpi-server"], check=False)
    started_in = time.monotonic() - started
    wait_for(lambda: "DevpiDown" not in firing(setup.prometheus), 120, "DevpiDown clears")
    cleared = time.monotonic() - started
    print(
        f"\nDevpiDown: fired after {fired:.1f} s; cleared {cleared:.1f} s after the start "
        f"command (which took {started_in:.1f} s)"
    )


def test_old_backup_fires_and_clears(setup: Setup) -> None:
    record = json.loads(setup.host.read(STATUS_BACKUP))
    assert record["ok"] is True
    good = record["finished"]
    record["finished"] = time.time() - 2 * BACKUP_MAX_AGE
    setup.host.write(STATUS_BACKUP, json.dumps(record) + "\n")
    fired = wait_for(
        lambda: "DevpiBackupTooOld" in firing(setup.prometheus), 60, "DevpiBackupTooOld fires"
    )
    record["finished"] = max(good, time.time())
    setup.host.write(STATUS_BACKUP, json.dumps(record) + "\n")
    cleared = wait_for(
        lambda: "DevpiBackupTooOld" not in firing(setup.prometheus), 60, "DevpiBackupTooOld clears"
    )
    print(f"\nDevpiBackupTooOld: fired after {fired:.1f} s, cleared after {cleared:.1f} s")


def test_metrics_off_stops_the_exporter(setup: Setup) -> None:
    setup.host.write(CONFIG, metrics_config(setup.ports, setup.metrics_port, False), mode=0o600)
    run = apply(setup.host)
    assert run.returncode == 0, run.stdout + run.stderr
    assert not setup.host.path("/etc/supervisor/conf.d/devpi-agent-metrics.conf").exists()
    with pytest.raises(OSError):
        scrape(setup.metrics_port)
    caddyfile = setup.host.read("/etc/caddy/Caddyfile").decode()
    assert "metrics" not in caddyfile
    again = apply(setup.host)
    assert again.returncode == 0 and again.report["changed"] == 0, again.stdout
