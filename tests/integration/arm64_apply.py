"""`make arm64-apply`: a full `apply` on the emulated arm64 host (arm64host.py), outside
`make test` (every arm64 instruction goes through qemu-user: apt's maintainer scripts, pip, devpi's
first start, Caddy). Then Caddy answers through basic auth, pip installs through the mirror, and a
second apply changes nothing. The figures go to test-artifacts/arm64-apply.json.

Not named test_*.py, so a plain `pytest tests` does not collect it; `make arm64-apply` names it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from agenthost import AGENT, CADDY_CA, CONFIG, REPO, USER_PASSWORD, Ports, config_text
from clients import Site, http_get, make_ca_bundle
from nspawn import NspawnHost

RESULTS = REPO / "test-artifacts" / "arm64-apply.json"
APPLY_TIMEOUT = 5400


def _apply(host: NspawnHost) -> tuple[int, dict[str, object], str, float]:
    started = time.monotonic()
    run = host.run(
        ["env", "-u", "HOME", AGENT, "apply", "--config", CONFIG, "--json"],
        check=False,
        timeout=APPLY_TIMEOUT,
    )
    seconds = time.monotonic() - started
    stdout = run.stdout.decode(errors="replace")
    try:
        report: dict[str, object] = json.loads(stdout)
    except ValueError:
        report = {}
    return run.returncode, report, run.stderr.decode(errors="replace"), seconds


def test_full_apply_under_emulation(arm64_host: NspawnHost, tmp_path: Path) -> None:
    ports = Ports.free()
    arm64_host.write(CONFIG, config_text(ports), mode=0o600)
    code, report, stderr, first = _apply(arm64_host)
    steps = {s["name"]: s["seconds"] for s in report.get("steps", [])}  # type: ignore[union-attr]
    figures: dict[str, object] = {"first_apply_s": round(first, 1), "steps_s": steps}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"arm64 (emulated) first apply: exit {code}, {first:.0f} s, steps {steps}")
    assert code == 0, stderr[-5000:]

    ca = tmp_path / "caddy-root.crt"
    ca.write_bytes(arm64_host.read(CADDY_CA))
    site = Site(
        "127.0.0.1",
        ports.https,
        "devops/pypi",
        "devops",
        USER_PASSWORD,
        make_ca_bundle(ca, tmp_path / "bundle.pem"),
    )
    assert http_get(site, "/+api", auth=None)[0] == 401
    assert http_get(site, "/+api", auth=("devops", USER_PASSWORD))[0] == 200

    code, report, stderr, again = _apply(arm64_host)
    figures["second_apply_s"] = round(again, 1)
    figures["second_changed"] = report.get("changed")
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    changed = report.get("changed")
    print(f"arm64 (emulated) second apply: exit {code}, {again:.1f} s, changed {changed}")
    assert code == 0 and report.get("changed") == 0, stderr[-3000:]
