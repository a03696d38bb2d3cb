"""A downloaded agent whose sha256 does not match the user data never runs, and cloud-init says
so: `cloud-init status` reports an error, the bootstrap log names the mismatch, nothing was
installed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import pytest
from conftest import AgentServer, VMFactory, console_on_failure, render_user_data
from qemu import VM

BOOT_TIMEOUT = 600


@pytest.fixture(scope="module")
def refused(make_vm: VMFactory, agent_server: AgentServer) -> Iterator[VM]:
    user_data = render_user_data(
        agent_server.agent,
        "--domain",
        "127.0.0.1",
        "--tls",
        "internal",
        "--user",
        "devops:canary-Bad-0a9f3e6d21",
        "--agent-url",
        agent_server.guest_url,
        "--agent-sha256",
        hashlib.sha256(b"some other agent").hexdigest(),
    )
    vm = make_vm(user_data, forwards={}, memory_mib=1024)
    try:
        seconds = vm.wait_cloud_init(BOOT_TIMEOUT)
    except Exception:
        print(console_on_failure(vm))
        raise
    print(f"boot to cloud-init finished (agent refused): {seconds:.0f}s")
    yield vm


def test_cloud_init_reports_the_error(refused: VM) -> None:
    status = refused.exec("cloud-init status --long")
    assert status.returncode != 0
    assert "status: error" in status.stdout, status.stdout
    errors = json.loads(refused.read("/run/cloud-init/result.json"))["v1"]["errors"]
    assert any("runcmd" in error or "scripts-user" in error for error in errors), errors


def test_the_agent_never_ran(refused: VM) -> None:
    bootstrap = refused.read("/var/log/devpi-agent/bootstrap.log")
    assert "refusing to run" in bootstrap
    assert "devpi-agent-bootstrap: exit 1" in bootstrap
    output = refused.read("/var/log/cloud-init-output.log")
    assert "refusing to run" in output
    for path in (
        "/usr/local/sbin/devpi-agent",
        "/var/log/devpi-agent/agent.core.log",
        "/opt/devpi-agent",
        "/var/cache/devpi-agent/pex",
    ):
        assert refused.exec(f"test -e {path}").returncode != 0, f"{path} exists"
    assert refused.output("ls /var/cache/devpi-agent").strip() == ""
