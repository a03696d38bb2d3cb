"""Delivery around the user data: the Vagrantfile (`vagrant validate`; what each provider gets is
in test_vagrantfile.py), `make release`,
and the release workflow that publishes what cloud-init.yaml downloads."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from conftest import REPO_ROOT

from agent.commands.userdata import DEFAULT_AGENT_URL, Account, UserData, render_user_data

VAGRANT_AGENT_URL = "file:///opt/devpi-agent-dist/devpi-agent"


def vagrant_validate(tmp_path: Path, user_data: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("vagrant")
    assert tool, "vagrant is not installed (apt-get install vagrant): `vagrant validate` is needed"
    env = {
        **os.environ,
        "DEVPI_AGENT_USER_DATA": str(user_data),
        # Vagrant's own state goes to the test's temp dir, not ~/.vagrant.d or the checkout.
        "VAGRANT_HOME": str(tmp_path / "vagrant-home"),
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot-vagrant"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
    }
    # --ignore-provider: neither VirtualBox nor libvirt can run here; the rest is validated.
    return subprocess.run(
        [tool, "validate", "--ignore-provider"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_vagrantfile_validates_with_the_rendered_user_data(tmp_path: Path) -> None:
    user_data = tmp_path / "vagrant-user-data.yaml"
    user_data.write_text(
        render_user_data(
            UserData(
                domain="localhost",
                tls="internal",
                https_port=8443,
                http_port=0,
                users=(Account("devops", "vagrant-password-1"),),
                agent_url=VAGRANT_AGENT_URL,
                agent_sha256="ab" * 32,
            )
        )
    )
    result = vagrant_validate(tmp_path, user_data)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout


def test_vagrantfile_and_makefile_agree() -> None:
    vagrantfile = (REPO_ROOT / "Vagrantfile").read_text()
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert 'BOX = ENV.fetch("DEVPI_AGENT_VAGRANT_BOX", "cloud-image/ubuntu-24.04")' in vagrantfile
    assert 'GUEST_AGENT = "/opt/devpi-agent-dist/devpi-agent"' in vagrantfile
    assert 'host_ip: "127.0.0.1"' in vagrantfile
    assert f"--agent-url {VAGRANT_AGENT_URL}" in makefile
    assert "--domain localhost --tls internal --https-port 8443" in makefile
    assert "HTTPS_PORT = 8443" in vagrantfile


def test_make_release_writes_checksums() -> None:
    result = subprocess.run(
        ["make", "-s", "release"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr
    dist = REPO_ROOT / "dist"
    sums = (dist / "SHA256SUMS").read_text()
    assert sums == (dist / "devpi-agent.sha256").read_text()
    assert sums.split() == [sums.split()[0], "devpi-agent"]
    check = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=dist, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_release_workflow_publishes_what_cloud_init_downloads() -> None:
    workflow = (REPO_ROOT / ".github" / "workflows" / "release.yml").read_text()
    assert 'tags: ["v*"]' in workflow
    assert "make release" in workflow
    assert "dist/devpi-agent dist/devpi-agent.sha256 dist/SHA256SUMS" in workflow
    makefile = (REPO_ROOT / "Makefile").read_text()
    repo = DEFAULT_AGENT_URL.removeprefix("https://github.com/").split("/releases/")[0]
    assert f"RELEASE_REPO := {repo}\n" in makefile
    assert DEFAULT_AGENT_URL.endswith("/releases/latest/download/devpi-agent")
