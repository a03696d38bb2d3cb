"""What differs on Ubuntu 24.04 (noble), whose archive this machine cannot reach, checked against
recorded facts: its os-release, its package names and versions, caddy's version string, and
apt's words when universe is off."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import UBUNTU_2404, FakeRunner, make_ctx, reference_config

from agent.core.context import StepFailed
from agent.facts.system import installed_packages, parse_caddy_version, parse_os_release
from agent.steps import apt as apt_step

# /etc/os-release of ubuntu-24.04-server-cloudimg-amd64 (noble, 2024-2026 builds).
NOBLE_OS_RELEASE = """\
PRETTY_NAME="Ubuntu 24.04.3 LTS"
NAME="Ubuntu"
VERSION_ID="24.04"
VERSION="24.04.3 LTS (Noble Numbat)"
VERSION_CODENAME=noble
ID=ubuntu
ID_LIKE=debian
HOME_URL="https://www.ubuntu.com/"
UBUNTU_CODENAME=noble
LOGO=ubuntu-logo
"""
# dpkg-query on a converged noble host (the packages apt installs; uv makes the venv, so no
# python3-venv): universe's caddy and supervisor, main's python3 3.12.
NOBLE_PACKAGES = (
    "python3\tii \t3.12.3-0ubuntu2\n"
    "supervisor\tii \t4.2.5-1\n"
    "caddy\tii \t2.6.2-6ubuntu0.24.04.3\n"
    "openssl\tii \t3.0.13-0ubuntu3.5\n"
)
# `caddy version` of Ubuntu's package (built by Ubuntu, no module info).
NOBLE_CADDY_VERSION = "2.6.2\n"
# apt-get install on a noble image without universe.
NO_UNIVERSE = """\
Reading package lists...
Building dependency tree...
Reading state information...
E: Unable to locate package caddy
E: Unable to locate package supervisor
"""


def test_noble_os_release() -> None:
    release = parse_os_release(NOBLE_OS_RELEASE)
    assert release == UBUNTU_2404
    assert release.pretty == "ubuntu 24.04 (noble)"


def test_noble_packages_and_versions() -> None:
    runner = FakeRunner().on(("dpkg-query",), stdout=NOBLE_PACKAGES)
    installed = installed_packages(runner, list(apt_step.PACKAGES))
    assert installed["caddy"] == "2.6.2-6ubuntu0.24.04.3"
    assert installed["python3"].startswith("3.12")
    assert set(installed) == set(apt_step.PACKAGES)


def test_noble_caddy_is_2_6_2() -> None:
    # 2.6: the Caddyfile gets `basicauth`, not 2.8's `basic_auth`.
    assert parse_caddy_version(NOBLE_CADDY_VERSION) == (2, 6, 2)


def test_apt_on_noble_without_universe_says_why(tmp_path: Path) -> None:
    runner = (
        FakeRunner()
        .on(("dpkg-query",), stdout="python3\tii \t3.12.3-0ubuntu2\n")
        .on(lambda call: "install" in call.argv, rc=100, stdout=NO_UNIVERSE)
    )
    ctx = make_ctx(tmp_path, reference_config(), runner, os_release=UBUNTU_2404)
    with pytest.raises(StepFailed) as caught:
        apt_step.converge(ctx)
    message = str(caught.value)
    assert "caddy, supervisor" in message and "universe" in message
    assert "add-apt-repository universe" in message
