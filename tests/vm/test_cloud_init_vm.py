"""The path most users take, end to end: a fresh Debian cloud VM (12 and 13) boots the project's
user data (rendered by the built agent's `devpi-agent user-data` from units/cloud-init.yaml.j2, the
template of the committed cloud-init.yaml), downloads the agent from the host, checks its sha256,
converges; then the real clients work through the forwarded HTTPS port, a reboot brings the server
back without a second run, and no password is in any log.

The VM is the Ubuntu-like first boot (vmimage.py's first-boot variant): no apt lists, apt-daily
refreshing them (holding their lock) as cloud-final starts, then unattended-upgrade, needrestart
restarting services by itself. The boot converges anyway with no failed step, and the agent's
log says how long apply waited for apt's locks. (``DEVPI_AGENT_VM_VARIANT=plain`` boots the plain
image instead, for its figures; the first-boot test then checks that none of that happened.)

One VM per module (qemu TCG: 8-13 min to converge); the tests check one thing each. This module
boots bookworm; test_cloud_init_vm_trixie.py runs the same tests on trixie, as its own file so that
`make test`'s two workers boot the two releases side by side.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from clients import (
    Site,
    build_wheel,
    http_get,
    make_ca_bundle,
    pip_install,
    twine_upload,
    uv_install,
)
from conftest import AgentServer, VMFactory, console_on_failure, render_user_data
from nspawn import free_port
from qemu import VM

PASSWORD = "canary-Vm-5d1e8b7c30"
PACKAGE = "devpi-agent-vm-canary"
CADDY_CA = "/var/lib/caddy/.local/share/caddy/pki/authorities/local/root.crt"
USER_DATA_LIMIT = 16 * 1024
BOOT_TIMEOUT = 1800  # bounded; ~8 min on an idle 2-core machine, far more when it is shared
SUITES: tuple[str, ...] = ("bookworm",)
VARIANT = "first-boot"
AGENT_LOG = "/var/log/devpi-agent/agent.core.log"
APT_DAILY = ("apt-daily.service", "apt-daily-upgrade.service")


@dataclass
class Booted:
    suite: str
    variant: str
    vm: VM
    site: Site
    user_data: str
    ready_seconds: float
    workdir: Path


@pytest.fixture(scope="module")
def booted(
    make_vm: VMFactory,
    agent_server: AgentServer,
    tmp_path_factory: pytest.TempPathFactory,
    suite: str,
    variant: str,
) -> Iterator[Booted]:
    port = free_port()
    user_data = render_user_data(
        agent_server.agent,
        # A name, not 127.0.0.1: clients send no SNI for an IP address, and behind qemu's NAT
        # Caddy would then look for a certificate for the guest's own address (10.0.2.15).
        "--domain",
        "localhost",
        "--tls",
        "internal",
        "--https-port",
        str(port),
        "--user",
        f"devops:{PASSWORD}",
        "--agent-url",
        agent_server.guest_url,
        "--agent-file",
        str(agent_server.agent),
    )
    # Same port inside and out: the https links devpi writes work from the host.
    vm = make_vm(user_data, forwards={port: port})
    try:
        ready = vm.wait_cloud_init(BOOT_TIMEOUT)
    except Exception:
        print(console_on_failure(vm))
        raise
    print(f"{suite} {variant}: boot to cloud-init finished (converged): {ready:.0f}s")
    workdir = tmp_path_factory.mktemp("vm-clients")
    ca = workdir / "caddy-root.crt"
    ca.write_text(vm.read(CADDY_CA) if vm.exec(f"test -e {CADDY_CA}").returncode == 0 else "")
    bundle = make_ca_bundle(ca, workdir / "ca-bundle.pem")
    site = Site("localhost", port, "devops/pypi", "devops", PASSWORD, bundle)
    yield Booted(suite, variant, vm, site, user_data, ready, workdir)


def test_user_data_is_valid_and_small(booted: Booted, tmp_path: Path) -> None:
    path = tmp_path / "user-data"
    path.write_text(booted.user_data)
    result = subprocess.run(
        ["cloud-init", "schema", "-c", str(path), "--annotate"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(booted.user_data.encode()) < USER_DATA_LIMIT


def test_cloud_init_done_without_errors(booted: Booted) -> None:
    status = booted.vm.exec("cloud-init status --long")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "status: done" in status.stdout
    result = json.loads(booted.vm.read("/run/cloud-init/result.json"))
    assert result["v1"]["errors"] == []
    print(f"{booted.suite} {booted.variant}: boot-to-ready {booted.ready_seconds:.0f}s")


def _usec(vm: VM, unit: str, prop: str) -> int:
    return int(vm.output(f"systemctl show -p {prop} --value {unit}").strip() or 0)


def test_first_boot_apt_housekeeping(booted: Booted) -> None:
    """apt-daily refreshed the missing lists while cloud-final ran the agent, unattended-upgrade
    ran too, and apply waited for their locks, then converged with no failed step."""
    vm = booted.vm
    events = [json.loads(line) for line in vm.read(AGENT_LOG).splitlines()]
    recaps = [e for e in events if e.get("event") == "recap"]
    assert len(recaps) == 1 and recaps[0]["failed"] == 0, recaps
    waits = [e for e in events if e.get("event") == "waiting for apt's locks"]
    freed = [e["waited"] for e in events if e.get("event") == "apt locks free"]
    installed = vm.exec("dpkg-query -W unattended-upgrades needrestart").returncode == 0
    failed_units = vm.output("systemctl list-units --failed --plain --no-legend").strip()
    print(
        f"{booted.suite} {booted.variant}: apply waited {sum(freed):.1f} s for apt's locks "
        f"({[w['holders'] for w in waits]}; each wait {freed}); failed units: {failed_units!r}"
    )
    if booted.variant == "plain":
        assert not installed and not waits
        return
    assert installed
    for timer in ("apt-daily.timer", "apt-daily-upgrade.timer"):
        assert vm.output(f"systemctl is-enabled {timer}").strip() == "enabled"
    final_start = _usec(vm, "cloud-final.service", "ExecMainStartTimestampMonotonic")
    final_end = _usec(vm, "cloud-final.service", "ExecMainExitTimestampMonotonic")
    for unit in APT_DAILY:
        # Each fired during this boot, by its timer, and finished without failing (bounded:
        # unattended-upgrade may still run after the bootstrap).
        deadline = time.monotonic() + 900
        while (
            _usec(vm, unit, "ExecMainExitTimestampMonotonic") == 0
            or vm.output(f"systemctl show -p ActiveState --value {unit}").strip() != "inactive"
        ):
            assert time.monotonic() < deadline, f"{unit} did not run and finish"
            time.sleep(5)
        assert vm.output(f"systemctl show -p Result --value {unit}").strip() == "success", unit
    daily_start = _usec(vm, APT_DAILY[0], "ExecMainStartTimestampMonotonic")
    daily_end = _usec(vm, APT_DAILY[0], "ExecMainExitTimestampMonotonic")
    # apt-daily was refreshing the lists while cloud-final (the agent's unit) ran.
    assert daily_start < final_end and daily_end > final_start, (daily_start, daily_end)
    print(
        f"{booted.suite}: apt-daily ran {(daily_end - daily_start) / 1e6:.0f} s, from "
        f"{(daily_start - final_start) / 1e6:+.0f} s after cloud-final started"
    )
    # Whether apply met their locks depends on how fast apt-daily is: every wait it began ended
    # (and apply converged, above); the figure is printed.
    assert len(freed) == len(waits), (waits, freed)
    assert vm.exec("ls /var/lib/apt/lists/*_Packages*").returncode == 0
    assert "apt-daily" not in failed_units and "cloud-" not in failed_units, failed_units


def test_agent_converged_once(booted: Booted, agent_server: AgentServer) -> None:
    bootstrap = booted.vm.read("/var/log/devpi-agent/bootstrap.log")
    assert "verified; running /usr/local/sbin/devpi-agent apply" in bootstrap
    assert "recap: ok=" in bootstrap
    assert bootstrap.count("devpi-agent-bootstrap: exit 0") == 1
    assert agent_server.downloads() == 1


def test_config_is_root_only(booted: Booted) -> None:
    assert booted.vm.output("stat -c '%a %U %G' /etc/devpi-agent/config.toml").split() == [
        "600",
        "root",
        "root",
    ]
    assert booted.vm.output("stat -c '%a' /etc/devpi-agent").strip() == "700"


def test_wrong_password_is_refused(booted: Booted) -> None:
    assert http_get(booted.site, "/+api", auth=None)[0] == 401
    assert http_get(booted.site, "/+api", auth=("devops", "not-the-password"))[0] == 401
    assert http_get(booted.site, "/+api", auth=("devops", PASSWORD))[0] == 200


def test_twine_pip_uv(booted: Booted, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    wheel = build_wheel(tmp_path, PACKAGE, "1.0.0")
    upload = twine_upload(booted.site, wheel, home)
    assert upload.returncode == 0, upload.stdout + upload.stderr
    pip = pip_install(booted.site, home, tmp_path / "pip-target", PACKAGE)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert (tmp_path / "pip-target" / PACKAGE.replace("-", "_") / "__init__.py").exists()
    uv = uv_install(booted.site, home, tmp_path / "uv-target", PACKAGE)
    assert uv.returncode == 0, uv.stdout + uv.stderr
    assert (tmp_path / "uv-target" / PACKAGE.replace("-", "_") / "__init__.py").exists()


def test_no_password_in_any_log(booted: Booted) -> None:
    vm = booted.vm
    assert vm.exec("test -s /var/log/devpi-agent/agent.core.log").returncode == 0
    logs = vm.output("find /var/log -type f ! -path '/var/log/journal/*' -exec cat {} +")
    assert "cloud-init" in logs and "recap" in logs
    journal = vm.output("journalctl -b --no-pager -o cat", timeout=300)
    for text in (logs, journal):
        assert PASSWORD not in text


def test_reboot_serves_again_without_a_second_run(
    booted: Booted, agent_server: AgentServer
) -> None:
    vm = booted.vm
    seconds = vm.reboot()
    print(f"reboot to cloud-init finished: {seconds:.0f}s")
    # devpi takes minutes to start under TCG on a busy machine; bounded all the same.
    started = time.monotonic()
    while True:
        with contextlib.suppress(OSError):  # Caddy not listening yet
            if http_get(booted.site, "/+api", auth=("devops", PASSWORD))[0] == 200:
                break
        assert time.monotonic() < started + 600, "the server did not answer after the reboot"
        time.sleep(2)
    print(f"then serving again after {time.monotonic() - started:.0f}s")
    status = vm.exec("cloud-init status --long")
    assert "status: done" in status.stdout, status.stdout
    agent_log = vm.read("/var/log/devpi-agent/agent.core.log")
    applies = [line for line in agent_log.splitlines() if json.loads(line).get("event") == "apply"]
    assert len(applies) == 1
    assert vm.read("/var/log/devpi-agent/bootstrap.log").count("devpi-agent-bootstrap: exit") == 1
    assert agent_server.downloads() == 1
