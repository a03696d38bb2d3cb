"""devpi's venv from the shipped lock: two hosts converged at different times get the same bytes
in site-packages, and a lock whose hash does not match fails the venv step while devpi keeps
serving from the old venv (same pid). On Debian 12 and 13 (Python 3.11 and 3.13).
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from pathlib import Path

from agenthost import AGENT, CONFIG, DIST, Ports, apply, config_text
from nspawn import NspawnHost

from agent.core.devpilock import shipped_lock

SUITES = ("bookworm", "trixie")
VENV = "/opt/devpi-agent/venv"
TAMPERED_LOCK = "/etc/devpi-agent/tampered.lock"


def site_packages_hashes(host: NspawnHost) -> dict[str, str]:
    """Every file the RECORD files list -> the sha256 of the file on disk ("" for the files
    RECORD gives no hash: RECORD itself and the bytecode pip compiled, which holds install
    times)."""
    [site] = host.path(VENV).glob("lib/python3*/site-packages")
    hashes: dict[str, str] = {}
    for record in sorted(site.glob("*.dist-info/RECORD")):
        for line in record.read_text().splitlines():
            name, digest, _size = line.rsplit(",", 2)
            if not digest:
                hashes[name] = ""
                continue
            data = (site / name).resolve().read_bytes()
            actual = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
            assert actual.rstrip("=") == digest.rstrip("="), f"{name} differs from its RECORD"
            hashes[name] = digest
    return hashes


def converge(rootfs: Path, ports: Ports) -> NspawnHost:
    host = NspawnHost(rootfs)
    host.prepare()
    host.copy_in(DIST, AGENT, mode=0o755)
    host.write(CONFIG, config_text(ports), mode=0o600)
    host.start(systemd=True)
    started = time.monotonic()
    run = apply(host)
    assert run.returncode == 0, run.stderr[-5000:]
    print(f"{host.machine}: first apply {time.monotonic() - started:.1f} s")
    return host


def devpi_pid(host: NspawnHost) -> int:
    return int(host.output(["supervisorctl", "pid", "devpi-server"]))


def devpi_answers(host: NspawnHost, ports: Ports) -> bool:
    probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{ports.devpi}/+api')"
    return host.run(["python3", "-c", probe], check=False).returncode == 0


def tampered_lock() -> str:
    """The shipped lock with idna moved to another release under a hash no file has."""
    lock = shipped_lock()
    block = re.compile(r"^idna==[^\n]*\\\n(?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+", re.M)
    assert block.search(lock), "idna is not in the shipped lock"
    return block.sub("idna==3.10 \\\\\n    --hash=sha256:" + "0" * 64 + "\n", lock)


def test_two_hosts_get_identical_site_packages_and_a_bad_hash_changes_nothing(
    rootfs: Path,
) -> None:
    assert DIST.exists(), f"{DIST} is missing: run `make dist` first"
    ports = Ports.free()
    first = converge(rootfs, ports)
    try:
        one = site_packages_hashes(first)
        lock_one = first.path(f"{VENV}/devpi-agent.lock").read_text()
    except BaseException:
        print(first.debug_report())
        raise
    finally:
        first.stop()
    second = converge(rootfs, ports)
    try:
        two = site_packages_hashes(second)
        assert lock_one == second.path(f"{VENV}/devpi-agent.lock").read_text() == shipped_lock()
        hashed = sum(1 for digest in one.values() if digest)
        assert hashed > 3000, f"only {hashed} hashed files in site-packages"
        assert one == two, sorted(set(one.items()) ^ set(two.items()))[:20]
        print(f"{hashed} files identical on both hosts ({len(one)} listed)")

        pid = devpi_pid(second)
        second.write(TAMPERED_LOCK, tampered_lock(), mode=0o644)
        config = config_text(ports).replace(
            f"port = {ports.devpi}\n", f'port = {ports.devpi}\nlock_file = "{TAMPERED_LOCK}"\n', 1
        )
        second.write(CONFIG, config, mode=0o600)
        run = apply(second)
        assert run.returncode != 0
        steps = {s["name"]: s["status"] for s in run.report["steps"]}  # type: ignore[union-attr]
        assert steps["venv"] == "failed", steps
        assert "does not match its sha256 hash in the lock" in run.stderr, run.stderr[-3000:]
        assert "idna" in run.stderr
        assert devpi_pid(second) == pid
        assert devpi_answers(second, ports)
        assert site_packages_hashes(second) == two  # the venv as it was
    except BaseException:
        print(second.debug_report())
        raise
    finally:
        second.stop()
