"""The Vagrantfile as Vagrant itself loads it (tests/unit/vagrantfile_dump.rb, through Vagrant's
own config loader): what VirtualBox and libvirt get (the provisioners that carry the agent and
the user data, the user data equal to the template's rendering, the forwarded port), and its
checks before `up`. The libvirt path also runs for real in tests/vagrant; VirtualBox cannot run
here, so this is its test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT

from agent.commands.userdata import Account, UserData, render_user_data

DUMP = Path(__file__).with_name("vagrantfile_dump.rb")
UPLOAD_DIR = "/tmp/devpi-agent-vagrant"
GUEST_AGENT = "/opt/devpi-agent-dist/devpi-agent"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A copy of what Vagrant reads (Vagrantfile, first-boot script, dist/ with the user data
    `make vagrant-user-data` wrote); the password it printed."""
    build = subprocess.run(["make", "-s", "dist"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    project = tmp_path_factory.mktemp("vagrant-project")
    (project / "tools").mkdir()
    (project / "dist").mkdir()
    shutil.copy2(REPO_ROOT / "Vagrantfile", project)
    shutil.copy2(REPO_ROOT / "tools" / "vagrant-first-boot.sh", project / "tools")
    for name in ("devpi-agent", "devpi-agent.sha256"):
        shutil.copy2(REPO_ROOT / "dist" / name, project / "dist")
    made = subprocess.run(
        [
            "make",
            "-s",
            "vagrant-user-data",
            f"VAGRANT_USER_DATA={project}/dist/vagrant-user-data.yaml",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    found = re.search(r"generated password for devops: (\S+)", made.stderr)
    assert found, made.stderr
    return project, found.group(1)


def dump(project: Path, tmp: Path, **env: str) -> dict[str, Any]:
    ruby = shutil.which("ruby")
    assert ruby, "ruby is missing (apt-get install ruby vagrant)"
    # VirtualBox's provider asks VBoxManage for its version: a stub answers.
    stub = tmp / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "VBoxManage").write_text("#!/bin/sh\necho 7.0.20r163906\n")
    (stub / "VBoxManage").chmod(0o755)
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("VAGRANT_", "DEVPI_AGENT_"))},
        "PATH": f"{stub}:{os.environ['PATH']}",
        "VAGRANT_HOME": str(tmp / "vagrant-home"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
        **env,
    }
    result = subprocess.run(
        [ruby, str(DUMP), str(project), "virtualbox", "libvirt"],
        cwd=project,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


@pytest.fixture(scope="module")
def loaded(project: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return dump(project[0], tmp_path_factory.mktemp("vagrant-dump"))


PROVIDERS = ("virtualbox", "libvirt")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_provisioners_carry_the_agent_and_the_user_data(
    loaded: dict[str, Any], project: tuple[Path, str], provider: str
) -> None:
    path = project[0]
    machine = loaded["machines"][provider]
    assert machine["errors"] == {}, machine["errors"]
    assert [(p["name"], p["type"]) for p in machine["provisioners"]] == [
        ("devpi-agent", "file"),
        ("user-data", "file"),
        ("first-boot", "shell"),
    ]
    agent, user_data, first_boot = (p["config"] for p in machine["provisioners"])
    assert agent["source"] == str(path / "dist" / "devpi-agent")
    assert agent["destination"] == f"{UPLOAD_DIR}/devpi-agent"
    assert user_data["source"] == str(path / "dist" / "vagrant-user-data.yaml")
    assert user_data["destination"] == f"{UPLOAD_DIR}/user-data"
    assert first_boot["path"] == str(path / "tools" / "vagrant-first-boot.sh")
    assert first_boot["args"] == [UPLOAD_DIR, GUEST_AGENT]
    assert first_boot["privileged"] is True
    # Nothing rides on a synced folder or on Vagrant's cloud_init.
    assert machine["synced_folders"] == {"/vagrant": {"disabled": True}}


def test_the_user_data_is_the_templates_rendering(project: tuple[Path, str]) -> None:
    path, password = project
    agent = path / "dist" / "devpi-agent"
    expected = render_user_data(
        UserData(
            domain="localhost",
            tls="internal",
            https_port=8443,
            http_port=0,
            users=(Account("devops", password),),
            agent_url=f"file://{GUEST_AGENT}",
            agent_sha256=hashlib.sha256(agent.read_bytes()).hexdigest(),
        )
    )
    uploaded = path / "dist" / "vagrant-user-data.yaml"
    assert uploaded.read_text() == expected
    assert uploaded.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("provider", PROVIDERS)
def test_https_is_forwarded_to_the_hosts_loopback_only(
    loaded: dict[str, Any], provider: str
) -> None:
    ports = loaded["machines"][provider]["forwarded_ports"]
    https = [p for p in ports if p["guest"] == 8443]
    assert len(https) == 1
    assert https[0]["host"] == 8443 and https[0]["host_ip"] == "127.0.0.1"
    # Vagrant's own SSH forward (VirtualBox) is on the loopback too.
    assert all(p["host_ip"] == "127.0.0.1" for p in ports)


def test_box_resources_triggers_and_message(
    loaded: dict[str, Any], project: tuple[Path, str]
) -> None:
    machines = loaded["machines"]
    for provider in PROVIDERS:
        machine = machines[provider]
        assert machine["box"] == "cloud-image/ubuntu-24.04"
        assert [t["name"] for t in machine["before"]] == ["devpi-agent: checks"] * 3
        assert {t["command"] for t in machine["before"]} == {"up", "provision", "reload"}
        after = {(t["name"], t["command"]) for t in machine["after"]}
        assert ("devpi-agent: the server's CA", "up") in after
        assert ("devpi-agent: remove the copied CA", "destroy") in after
        message = machine["post_up_message"]
        assert "https://localhost:8443/devops/pypi/" in message
        assert f"PIP_CERT={project[0]}/vagrant-ca-bundle.pem" in message
        assert "uv pip install" in message and "twine upload" in message
    assert machines["libvirt"]["provider"] == {"memory": 2048, "cpus": 2}
    customizations = machines["virtualbox"]["provider"]["customizations"]
    assert ["pre-boot", ["modifyvm", "id", "--memory", "2048"]] in customizations
    assert ["pre-boot", ["modifyvm", "id", "--cpus", 2]] in customizations


def test_the_box_name_is_overridden_by_the_environment(
    project: tuple[Path, str], tmp_path: Path
) -> None:
    data = dump(project[0], tmp_path, DEVPI_AGENT_VAGRANT_BOX="local/test-box")
    assert {m["box"] for m in data["machines"].values()} == {"local/test-box"}


def test_the_checks_before_up(
    loaded: dict[str, Any], project: tuple[Path, str], tmp_path: Path
) -> None:
    assert loaded["problems"]["virtualbox"] is None
    assert loaded["problems"]["libvirt"] is None
    assert "provider docker is not supported" in loaded["problems"]["docker"]
    # An agent rebuilt after the user data was rendered: refused, with what to do.
    changed = tmp_path / "project"
    shutil.copytree(project[0], changed)
    (changed / "dist" / "devpi-agent.sha256").write_text("0" * 64 + "  devpi-agent\n")
    problem = dump(changed, tmp_path)["problems"]["virtualbox"]
    assert "does not match" in problem and "make vagrant-user-data" in problem
    (changed / "dist" / "vagrant-user-data.yaml").unlink()
    shutil.copy2(project[0] / "dist" / "devpi-agent.sha256", changed / "dist")
    problem = dump(changed, tmp_path)["problems"]["virtualbox"]
    assert "is missing: run `make vagrant-user-data` first" in problem
