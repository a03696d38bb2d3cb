"""Fixtures for the Vagrant tier: the project's Vagrantfile run by the real Vagrant and
vagrant-libvirt, against a libvirtd of the test's own (tests/vagrant/libvirtns.py), with a box
built from the VM tier's cached Debian 12 image (tests/vagrant/vagrantbox.py). One VM per run.

These tests never skip: on a machine that cannot run them they fail and say what is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
REPO = _HERE.parents[1]
sys.path.insert(0, str(_HERE))
sys.path.insert(0, str(REPO / "tests" / "vm"))
sys.path.insert(0, str(REPO / "tests" / "integration"))

from libvirtns import LibvirtError, LibvirtNamespace  # noqa: E402
from vagrantbox import BoxError, build_box  # noqa: E402
from vmimage import ImageError, build_image  # noqa: E402

DIST = REPO / "dist"
CACHE_DIR = Path(os.environ.get("DEVPI_AGENT_TEST_CACHE") or "/var/cache/devpi-agent-tests")
BOX_NAME = "devpi-agent-test/debian-12"
UP_TIMEOUT = 2700  # bounded; ~7 min on an idle 2-core machine under TCG, far more when shared


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.vagrant)


@dataclass
class VagrantRun:
    ns: LibvirtNamespace
    project: Path
    env: dict[str, str]
    password: str
    user_data: str
    up: subprocess.CompletedProcess[str]
    up_started: float  # time.monotonic() when `vagrant up` started
    up_seconds: float
    networks_before: str
    destroyed: bool = False

    def vagrant(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return self.ns.run(["vagrant", *args], timeout=timeout, env=self.env, cwd=self.project)

    def ssh(self, command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.vagrant("ssh", "-c", command, timeout=timeout)


def _problems() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (libvirtd, namespaces, the box's loop mount)")
    for tool in ("vagrant", "qemu-system-x86_64", "qemu-img", "ruby"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is missing (tools/install-prereqs.sh)")
    plugins = subprocess.run(["vagrant", "plugin", "list"], capture_output=True, text=True)
    if "vagrant-libvirt" not in plugins.stdout:
        problems.append("vagrant-libvirt is missing (apt-get install vagrant-libvirt)")
    for name in ("devpi-agent", "devpi-agent.sha256"):
        if not (DIST / name).is_file():
            problems.append(f"dist/{name} is missing: run `make dist` first")
    return problems


def _project(tmp: Path) -> Path:
    """A copy of what `vagrant up` reads from the checkout: the Vagrantfile (unchanged), the
    first-boot script and dist/ (so the CA files and .vagrant/ land here, not in the checkout)."""
    project = tmp / "project"
    (project / "tools").mkdir(parents=True)
    (project / "dist").mkdir()
    shutil.copy2(REPO / "Vagrantfile", project / "Vagrantfile")
    shutil.copy2(REPO / "tools" / "vagrant-first-boot.sh", project / "tools")
    for name in ("devpi-agent", "devpi-agent.sha256"):
        shutil.copy2(DIST / name, project / "dist" / name)
    return project


def make_user_data(target: Path) -> str:
    """`make vagrant-user-data` into target; returns the password it printed."""
    result = subprocess.run(
        ["make", "-s", "vagrant-user-data", f"VAGRANT_USER_DATA={target}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"generated password for devops: (\S+)", result.stderr)
    assert found, result.stderr
    return found.group(1)


@pytest.fixture(scope="session")
def vagrant_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VagrantRun]:
    problems = _problems()
    if problems:
        pytest.fail("Vagrant tests cannot run here: " + "; ".join(problems), pytrace=False)
    try:
        started = time.monotonic()
        box = build_box(build_image(CACHE_DIR), CACHE_DIR)
        print(f"box {box.file} ready in {time.monotonic() - started:.1f}s")
    except (ImageError, BoxError) as error:
        pytest.fail(f"building the Vagrant box failed: {error}", pytrace=False)
    tmp = tmp_path_factory.mktemp("vagrant")
    project = _project(tmp)
    password = make_user_data(project / "dist" / "vagrant-user-data.yaml")
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": str(tmp / "home"),
        "LANG": "C.UTF-8",
        "VAGRANT_HOME": str(tmp / "vagrant-home"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
        "VAGRANT_DEFAULT_PROVIDER": "libvirt",
        "LIBVIRT_DEFAULT_URI": "qemu:///system",
        "DEVPI_AGENT_VAGRANT_BOX": BOX_NAME,
    }
    (tmp / "home").mkdir()
    ns = LibvirtNamespace(tmp)
    try:
        ns.start()
    except LibvirtError as error:
        ns.stop()
        pytest.fail(f"libvirt did not start in the test's namespace: {error}", pytrace=False)
    run: VagrantRun | None = None
    try:
        add = ns.run(
            ["vagrant", "box", "add", "--name", BOX_NAME, str(box.file)],
            timeout=600,
            env=env,
            cwd=project,
        )
        assert add.returncode == 0, add.stdout + add.stderr
        networks_before = ns.virsh("net-list", "--all", "--name")
        up_started = time.monotonic()
        up = ns.run(
            ["vagrant", "up", "--provider=libvirt"], timeout=UP_TIMEOUT, env=env, cwd=project
        )
        up_seconds = time.monotonic() - up_started
        print(f"vagrant up: exit {up.returncode} after {up_seconds:.0f}s")
        print(up.stdout[-6000:], up.stderr[-3000:])
        run = VagrantRun(
            ns,
            project,
            env,
            password,
            (project / "dist" / "vagrant-user-data.yaml").read_text(),
            up,
            up_started,
            up_seconds,
            networks_before,
        )
        yield run
    finally:
        if run is not None and not run.destroyed:
            result = run.vagrant("destroy", "-f", timeout=600)
            print(f"teardown: vagrant destroy -f: exit {result.returncode}")
        ns.stop()
        leftovers = ns.leftovers()
        assert not leftovers, leftovers
