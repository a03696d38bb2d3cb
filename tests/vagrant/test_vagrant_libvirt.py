"""`vagrant up --provider=libvirt` with the project's Vagrantfile converges a server that the real
clients use from the host (twine, pip, uv through the forwarded port, trusting the CA the
Vagrantfile copied out); cloud-init ran the very user data `make vagrant-user-data` rendered;
`vagrant destroy -f` leaves no domain, volume, network or process behind.

One VM per run (qemu TCG); the tests check one thing each, in this order (destroy last).
"""

from __future__ import annotations

import time
from pathlib import Path

from clients import Site, build_wheel, http_get, pip_install, twine_upload, uv_install
from conftest import VagrantRun

PACKAGE = "devpi-agent-vagrant-canary"
PORT = 8443


def _site(run: VagrantRun) -> Site:
    return Site(
        "localhost",
        PORT,
        "devops/pypi",
        "devops",
        run.password,
        run.project / "vagrant-ca-bundle.pem",
    )


def test_vagrant_up_ends_with_a_ready_server(vagrant_run: VagrantRun) -> None:
    up = vagrant_run.up
    assert up.returncode == 0, up.stdout[-8000:] + up.stderr[-4000:]
    # The first-boot provisioner waited for cloud-init and the agent's recap.
    assert "status: done" in up.stdout
    assert "recap: ok=" in up.stdout
    # The post-up message names this VM's URL and the client lines.
    assert f"https://localhost:{PORT}/devops/pypi/" in up.stdout
    assert "pip install --index-url" in up.stdout
    ca = (vagrant_run.project / "vagrant-ca.crt").read_text()
    assert ca.startswith("-----BEGIN CERTIFICATE-----")
    assert (vagrant_run.project / "vagrant-ca-bundle.pem").read_text().endswith(ca)
    print(f"vagrant up: {vagrant_run.up_seconds:.0f}s")


def test_cloud_init_ran_the_rendered_user_data(vagrant_run: VagrantRun) -> None:
    status = vagrant_run.ssh("cloud-init status --long")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "status: done" in status.stdout
    ran = vagrant_run.ssh("sudo cat /var/lib/cloud/instance/user-data.txt")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.replace("\r\n", "\n") == vagrant_run.user_data
    bootstrap = vagrant_run.ssh("sudo cat /var/log/devpi-agent/bootstrap.log").stdout
    assert "file:///opt/devpi-agent-dist/devpi-agent" in bootstrap
    assert "verified; running /usr/local/sbin/devpi-agent apply" in bootstrap
    assert bootstrap.count("devpi-agent-bootstrap: exit 0") == 1
    # The copy of the user data the provisioner uploaded (it holds the password) is gone.
    assert vagrant_run.ssh("test -e /tmp/devpi-agent-vagrant").returncode != 0


def test_wrong_password_is_refused(vagrant_run: VagrantRun) -> None:
    site = _site(vagrant_run)
    with vagrant_run.ns.entered():
        assert http_get(site, "/+api", auth=None)[0] == 401
        assert http_get(site, "/+api", auth=("devops", "not-the-password"))[0] == 401
        assert http_get(site, "/+api", auth=("devops", vagrant_run.password))[0] == 200


def test_twine_pip_uv_from_the_host(vagrant_run: VagrantRun, tmp_path: Path) -> None:
    site = _site(vagrant_run)
    home = tmp_path / "home"
    home.mkdir()
    wheel = build_wheel(tmp_path, PACKAGE, "1.0.0")
    with vagrant_run.ns.entered():
        upload = twine_upload(site, wheel, home)
        assert upload.returncode == 0, upload.stdout + upload.stderr
        pip = pip_install(site, home, tmp_path / "pip-target", PACKAGE)
        assert pip.returncode == 0, pip.stdout + pip.stderr
        working = time.monotonic() - vagrant_run.up_started
        uv = uv_install(site, home, tmp_path / "uv-target", PACKAGE)
        assert uv.returncode == 0, uv.stdout + uv.stderr
    assert (tmp_path / "pip-target" / PACKAGE.replace("-", "_") / "__init__.py").exists()
    assert (tmp_path / "uv-target" / PACKAGE.replace("-", "_") / "__init__.py").exists()
    print(f"vagrant up -> a working pip install: {working:.0f}s")


def test_a_failing_bootstrap_fails_the_provisioner(vagrant_run: VagrantRun, tmp_path: Path) -> None:
    """The first-boot script again, with user data whose agent sha256 is wrong: it exits non-zero
    (so would `vagrant up`) and shows the end of cloud-init's output log with the bootstrap's
    refusal."""
    project = vagrant_run.project
    bad = tmp_path / "user-data"
    wanted = (project / "dist" / "devpi-agent.sha256").read_text().split()[0]
    assert f"AGENT_SHA256={wanted}" in vagrant_run.user_data
    bad.write_text(vagrant_run.user_data.replace(wanted, "0" * 64))
    for source, name in (
        (bad, "user-data"),
        (project / "dist" / "devpi-agent", "devpi-agent"),
        (project / "tools" / "vagrant-first-boot.sh", "first-boot.sh"),
    ):
        upload = vagrant_run.vagrant("upload", str(source), f"/tmp/failing/{name}")
        assert upload.returncode == 0, upload.stdout + upload.stderr
    result = vagrant_run.ssh(
        "sudo bash /tmp/failing/first-boot.sh /tmp/failing /opt/devpi-agent-dist/devpi-agent",
        timeout=1200,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "devpi-agent first boot: FAILED" in output
    assert "the end of /var/log/cloud-init-output.log" in output
    assert f"expected {'0' * 64}" in output  # the bootstrap's refusal, from that log


def test_destroy_leaves_nothing(vagrant_run: VagrantRun) -> None:
    ns = vagrant_run.ns
    assert ns.virsh("list", "--all", "--name").strip()
    result = vagrant_run.vagrant("destroy", "-f")
    vagrant_run.destroyed = True
    assert result.returncode == 0, result.stdout + result.stderr
    assert ns.virsh("list", "--all", "--name").strip() == ""
    assert ns.virsh("net-list", "--all", "--name") == vagrant_run.networks_before
    # Only the box's base image stays in the pool (it belongs to the box, not to this VM).
    volumes = ns.virsh("vol-list", "default").split("\n")[2:]
    assert [v.split()[0] for v in volumes if v.strip() and "_vagrant_box_image_" not in v] == []
    assert not (vagrant_run.project / "vagrant-ca.crt").exists()
    assert not (vagrant_run.project / "vagrant-ca-bundle.pem").exists()
    # No forwarded-port ssh, qemu or dnsmasq left: only the two daemons the test started.
    daemons = {"libvirtd", "virtlogd"}
    rest = [p for p in ns.leftovers() if p.split(" ", 1)[1].split()[0] not in daemons]
    assert rest == []
