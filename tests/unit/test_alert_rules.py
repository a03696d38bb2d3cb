"""units/prometheus-devpi-rules.yml under `promtool test rules` (Debian's prometheus package,
installed by tools/install-prereqs.sh): each alert fires on the series that should fire it, and
stays quiet on a healthy host."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

RULES = Path(__file__).resolve().parents[2] / "units" / "prometheus-devpi-rules.yml"
LABELS = '{instance="pypi:9449", job="devpi"}'
ALERT_LABELS = {"instance": "pypi:9449", "job": "devpi"}


def series(name: str, values: str) -> dict[str, str]:
    return {"series": f"{name}{LABELS}", "values": values}


SUMMARIES = {
    rule["alert"]: rule["annotations"]["summary"]
    for group in yaml.safe_load(RULES.read_text())["groups"]
    for rule in group["rules"]
}


def alert(name: str, at: str, severity: str, fires: bool, value: str = "") -> dict[str, Any]:
    summary = (
        SUMMARIES[name]
        .replace("{{ $labels.instance }}", ALERT_LABELS["instance"])
        .replace("{{ $value }}", value)
    )
    expected = (
        [
            {
                "exp_labels": {**ALERT_LABELS, "severity": severity},
                "exp_annotations": {"summary": summary},
            }
        ]
        if fires
        else []
    )
    return {"eval_time": at, "alertname": name, "exp_alerts": expected}


# Healthy: devpi up, backups 10 min old of a 1 h limit, certificate 60 days away, half the
# disk free, the last apply fine. Each case below changes one thing.
HEALTHY = {
    "up": "1x200",
    "devpi_up": "1x200",
    "devpi_replica_serial_lag": "0x200",
    "devpi_replication_errors": "0x200",
    "devpi_certificate_ok": "1x200",
    # A 90-day certificate issued 30 days before t=0: 60 days left.
    "devpi_certificate_not_before_timestamp_seconds": f"{-30 * 86400}x200",
    "devpi_certificate_expiry_timestamp_seconds": f"{60 * 86400}x200",
    "devpi_backup_enabled": "1x200",
    "devpi_backup_ok": "1x200",
    "devpi_backup_max_age_seconds": "3600x200",
    "devpi_remote_backup_ok": "1x200",
    "devpi_disk_free_bytes": "500x200",
    "devpi_disk_size_bytes": "1000x200",
    "devpi_apply_ok": "1x200",
    "devpi_caddy_metrics_up": "1x200",
}
# Series whose value is a time: a backup that finished "now" at each 1 m step (60 s apart).
FRESH = "0+60x200"

CASES: dict[str, tuple[dict[str, str], str, str, str]] = {
    # alert: (changed series, when it is checked, before that (quiet), severity)
    "DevpiDown": ({"devpi_up": "1 1 0x200"}, "10m", "3m", "critical"),
    "DevpiExporterAbsent": ({"up": "1 0x200"}, "10m", "4m", "critical"),
    "DevpiReplicaLagging": ({"devpi_replica_serial_lag": "0 5x200"}, "20m", "9m", "warning"),
    "DevpiReplicationErrors": ({"devpi_replication_errors": "0 2x200"}, "20m", "10m", "warning"),
    "DevpiCertificateExpiring": (
        {
            "devpi_certificate_not_before_timestamp_seconds": f"{-80 * 86400}x200",
            "devpi_certificate_expiry_timestamp_seconds": f"{10 * 86400}x200",
        },
        "20m",
        "5m",
        "warning",
    ),
    "DevpiCertificateExpiringCritical": (
        {
            "devpi_certificate_not_before_timestamp_seconds": f"{-88 * 86400}x200",
            "devpi_certificate_expiry_timestamp_seconds": f"{2 * 86400}x200",
        },
        "1m",
        "",
        "critical",
    ),
    "DevpiCertificateUnreadable": ({"devpi_certificate_ok": "1 0x200"}, "15m", "5m", "warning"),
    # The last good backup at t=0 and never again: too old after backup_max_age (1 h).
    "DevpiBackupTooOld": (
        {"devpi_backup_last_success_timestamp_seconds": "0x200"},
        "65m",
        "55m",
        "critical",
    ),
    "DevpiBackupFailed": ({"devpi_backup_ok": "1 0x200"}, "2m", "", "warning"),
    "DevpiRemoteBackupTooOld": (
        {"devpi_remote_backup_last_success_timestamp_seconds": "0x200"},
        "65m",
        "55m",
        "critical",
    ),
    "DevpiRemoteBackupFailed": ({"devpi_remote_backup_ok": "0x200"}, "1m", "", "warning"),
    "DevpiDiskNearlyFull": ({"devpi_disk_free_bytes": "50x200"}, "10m", "", "critical"),
    "DevpiLastApplyFailed": ({"devpi_apply_ok": "1 0x200"}, "2m", "", "warning"),
    "DevpiCaddyMetricsMissing": ({"devpi_caddy_metrics_up": "1 0x200"}, "15m", "5m", "warning"),
}


def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.fail("promtool is missing: install Debian's prometheus (tools/install-prereqs.sh)")
    return found


def run_promtool(tmp_path: Path, tests: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    document = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}
    test_file = tmp_path / "rules.test.json"  # YAML is a superset of JSON
    test_file.write_text(json.dumps(document))
    return subprocess.run(
        [promtool(), "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def inputs(changed: dict[str, str]) -> list[dict[str, str]]:
    values = {
        **HEALTHY,
        "devpi_backup_last_success_timestamp_seconds": FRESH,
        "devpi_remote_backup_last_success_timestamp_seconds": FRESH,
        **changed,
    }
    return [series(name, value) for name, value in values.items()]


def test_rules_file_is_valid() -> None:
    checked = subprocess.run(
        [promtool(), "check", "rules", str(RULES)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("name", sorted(CASES))
def test_alert_fires_on_its_cause(tmp_path: Path, name: str) -> None:
    changed, at, quiet_until, severity = CASES[name]
    value = next(iter(changed.values())).split()[-1].split("x")[0]
    checks = [alert(name, at, severity, fires=True, value=value)]
    if quiet_until:
        checks.append(alert(name, quiet_until, severity, fires=False))
    result = run_promtool(
        tmp_path, [{"interval": "1m", "input_series": inputs(changed), "alert_rule_test": checks}]
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_healthy_host_fires_nothing(tmp_path: Path) -> None:
    severities = {name: case[3] for name, case in CASES.items()}
    checks = [alert(name, "3h", severities[name], fires=False) for name in CASES]
    checks.append(alert("DevpiBackupNeverSucceeded", "3h", "critical", fires=False))
    checks.append(alert("DevpiDiskFillingUp", "3h", "warning", fires=False))
    result = run_promtool(
        tmp_path, [{"interval": "1m", "input_series": inputs({}), "alert_rule_test": checks}]
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_backup_never_succeeded_and_disk_filling_up(tmp_path: Path) -> None:
    values = {**HEALTHY, "devpi_disk_free_bytes": "900-1x2000"}
    values.pop("devpi_backup_ok")
    checks = [
        alert("DevpiBackupNeverSucceeded", "27h", "critical", fires=True),
        alert("DevpiBackupNeverSucceeded", "25h", "critical", fires=False),
        alert("DevpiDiskFillingUp", "8h", "warning", fires=True),
    ]
    series_list = [series(name, value.replace("x200", "x2000")) for name, value in values.items()]
    result = run_promtool(
        tmp_path, [{"interval": "1m", "input_series": series_list, "alert_rule_test": checks}]
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_internal_certificate_renewed_by_caddy_is_quiet(tmp_path: Path) -> None:
    """A `tls internal` certificate lives 12 h and Caddy renews it at 4 h left: no alert then,
    which a fixed number of days would raise forever."""
    values = {
        **HEALTHY,
        "devpi_certificate_not_before_timestamp_seconds": f"{-8 * 3600}x200",
        "devpi_certificate_expiry_timestamp_seconds": f"{4 * 3600}x200",
    }
    checks = [
        alert("DevpiCertificateExpiring", "30m", "warning", fires=False),
        alert("DevpiCertificateExpiringCritical", "30m", "critical", fires=False),
    ]
    result = run_promtool(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": [series(n, v) for n, v in values.items()],
                "alert_rule_test": checks,
            }
        ],
    )
    assert result.returncode == 0, result.stdout + result.stderr
