"""Backups that leave the host (#17 part 2), with real components: a second nspawn host runs
OpenSSH as the SFTP remote (openssh-server installed inside it by the test; a 1 MiB tmpfs on it,
filled to its last 64 KiB, is the full remote). Host A uploads 100 packages, backs up to the
remote and is destroyed; host B, fresh and converged, restores from the remote and serves every
file with the same sha256; then a wrong repository password, an unreachable remote and a full
remote each fail clearly, leave the local backup, and show in remote-backup.json and `verify`.

The figures (a remote backup and a restore of 100 packages) are printed and go to the README.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from agenthost import AGENT, CADDY_CA, CONFIG, DIST, USER_PASSWORD, ApplyRun, Ports, apply
from agenthost import config_text as base_config
from clients import VENV_BIN, Site, build_wheel, make_ca_bundle, run
from nspawn import NspawnHost, free_port
from test_day2 import served_files

PACKAGES = 100
REPO_PASSWORD = "restic-Repo-Pw-5e1d9c"
WRONG_PASSWORD = "restic-Wrong-Pw-00000"
SECRETS = "/etc/devpi-agent"
BACKUP_DIR = "/var/backups/devpi"
STATUS = "/var/lib/devpi-agent/status/remote-backup.json"


@dataclass
class Remote:
    host: NspawnHost
    port: int
    key: bytes
    known_hosts: str

    def url(self, path: str = "/srv/restic") -> str:
        return f"sftp://root@127.0.0.1:{self.port}/{path}"


def agent_config(
    ports: Ports, remote: Remote, *, url: str | None = None, password: str = ""
) -> str:
    return (
        base_config(ports)
        + f"""
[backup]
keep = 3
remote = "{url or remote.url()}"
remote_password_file = "{SECRETS}/{password or "restic.pass"}"
remote_ssh_key_file = "{SECRETS}/restic-ssh-key"
remote_known_hosts_file = "{SECRETS}/restic-known-hosts"
remote_keep = 5
"""
    )


@pytest.fixture(scope="module")
def remote(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    host = NspawnHost(rootfs)
    host.prepare()
    host.start(systemd=True)
    try:
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        host.run(["apt-get", "update"], env=env, timeout=900)
        host.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "openssh-server"],
            env=env,
            timeout=900,
        )
        port = free_port()
        host.write(
            "/etc/ssh/sshd_config.d/test.conf",
            f"Port {port}\nListenAddress 127.0.0.1\nPasswordAuthentication no\n"
            "PermitRootLogin prohibit-password\n",
        )
        keydir = tmp_path_factory.mktemp("remote-key")
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keydir / "id")], check=True
        )
        host.write("/root/.ssh/authorized_keys", (keydir / "id.pub").read_bytes(), mode=0o600)
        host.path("/root/.ssh").chmod(0o700)
        host.run(["mkdir", "-p", "/srv/restic", "/srv/full"])
        # The full remote: 1 MiB, far less than an export of 100 packages.
        host.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", "/srv/full"])
        host.run(["systemctl", "restart", "ssh"], timeout=120)
        hostkey = host.read("/etc/ssh/ssh_host_ed25519_key.pub").decode().split()
        known = f"[127.0.0.1]:{port} {hostkey[0]} {hostkey[1]}\n"
        yield Remote(host, port, (keydir / "id").read_bytes(), known)
    except BaseException:
        print(host.debug_report())
        raise
    finally:
        host.stop()


def start_agent_host(rootfs: Path, ports: Ports, remote: Remote) -> NspawnHost:
    host = NspawnHost(rootfs)
    host.prepare()
    host.copy_in(DIST, AGENT, mode=0o755)
    host.write(CONFIG, agent_config(ports, remote), mode=0o600)
    host.write(f"{SECRETS}/restic.pass", REPO_PASSWORD + "\n", mode=0o600)
    host.write(f"{SECRETS}/restic-wrong.pass", WRONG_PASSWORD + "\n", mode=0o600)
    host.write(f"{SECRETS}/restic-ssh-key", remote.key, mode=0o600)
    host.write(f"{SECRETS}/restic-known-hosts", remote.known_hosts, mode=0o644)
    host.start(systemd=True)
    return host


@dataclass
class Agent:
    host: NspawnHost
    ports: Ports
    runs: list[ApplyRun] = field(default_factory=list)

    def agent(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[bytes]:
        return self.host.run(["env", "-u", "HOME", AGENT, *args], check=False, timeout=timeout)

    def site(self, bundle: Path) -> Site:
        return Site("127.0.0.1", self.ports.https, "devops/pypi", "devops", USER_PASSWORD, bundle)

    def record(self) -> dict[str, object]:
        return json.loads(self.host.read(STATUS))  # type: ignore[no-any-return]

    def verify(self) -> dict[str, dict[str, object]]:
        done = self.agent("verify", "--json")
        return {c["name"]: c for c in json.loads(done.stdout)["checks"]}

    def backups(self) -> list[str]:
        return sorted(self.host.output(["ls", BACKUP_DIR]).split())


@pytest.fixture(scope="module")
def hosts(rootfs: Path, remote: Remote) -> Iterator[tuple[Agent, Agent]]:
    """Host A and host B, converged at the same time (B is only used after A is gone)."""
    assert DIST.exists(), f"{DIST} is missing: run `make dist` first"
    agents = []
    try:
        for _ in range(2):
            ports = Ports.free()
            agents.append(Agent(start_agent_host(rootfs, ports, remote), ports))
        threads = [
            threading.Thread(target=lambda a=a: a.runs.append(apply(a.host)), daemon=True)
            for a in agents
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=1800)
        for a in agents:
            assert a.runs and a.runs[0].returncode == 0, a.runs and a.runs[0].stderr[-3000:]
        yield agents[0], agents[1]
    except BaseException:
        for a in agents:
            print(a.host.debug_report())
        raise
    finally:
        for a in agents:
            a.host.stop()


FIGURES: dict[str, float] = {}


def test_a_backup_goes_to_the_remote_and_a_fresh_host_restores_it(
    hosts: tuple[Agent, Agent], remote: Remote, tmp_path: Path
) -> None:
    first, fresh = hosts
    assert first.host.output(["restic", "version"]).startswith("restic ")
    bundle = make_ca_bundle(first.host.path(CADDY_CA), tmp_path / "ca-a.pem")
    (tmp_path / "wheels").mkdir()
    wheels = [
        build_wheel(tmp_path / "wheels", f"offsite-pkg-{n:03d}", "1.0") for n in range(PACKAGES)
    ]
    expected = {w.name: hashlib.sha256(w.read_bytes()).hexdigest() for w in wheels}
    site = first.site(bundle)
    home = tmp_path / "home"
    home.mkdir()
    pypirc = home / ".pypirc"
    pypirc.write_text(
        f"[distutils]\nindex-servers = devpi\n\n[devpi]\nrepository = {site.index_url}\n"
        f"username = {site.user}\npassword = {site.password}\n"
    )
    pypirc.chmod(0o600)
    uploaded = run(
        [str(VENV_BIN / "twine"), "upload", "--non-interactive", "-r", "devpi", *map(str, wheels)],
        site.client_env(home),
        home,
    )
    assert uploaded.returncode == 0, uploaded.stderr[-3000:]

    started = time.monotonic()
    done = first.agent("backup", "--json")
    FIGURES["remote backup of 100 packages, s"] = time.monotonic() - started
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads(done.stdout)
    assert report["remote"]["ok"] is True, report
    record = first.record()
    assert record["ok"] is True and record["snapshot"] == report["remote"]["snapshot"]
    assert {"bytes", "seconds", "finished"} <= set(record)
    FIGURES["of which the push to the remote, s"] = float(record["seconds"])  # type: ignore[arg-type]
    FIGURES["export size, MB"] = int(record["bytes"]) / 1e6  # type: ignore[call-overload]
    # The repository really is on the remote host, encrypted: no package name in it.
    assert remote.host.output(["ls", "/srv/restic"]).split() == [
        "config",
        "data",
        "index",
        "keys",
        "locks",
        "snapshots",
    ]
    grep = remote.host.run(["grep", "-rl", "offsite-pkg", "/srv/restic"], check=False)
    assert grep.returncode == 1, grep.stdout
    checks = first.verify()
    assert checks["remote-backup"]["ok"], checks["remote-backup"]
    first.host.stop()  # host A is gone, its disk with it

    started = time.monotonic()
    restored = fresh.agent("restore", "--remote", "latest")
    FIGURES["restore of 100 packages from the remote, s"] = time.monotonic() - started
    assert restored.returncode == 0, restored.stderr.decode()[-3000:]
    assert f"{PACKAGES} release files" in restored.stdout.decode()
    bundle_b = make_ca_bundle(fresh.host.path(CADDY_CA), tmp_path / "ca-b.pem")
    assert served_files(fresh.site(bundle_b), "devops/pypi") == expected
    # No temporary restore left behind in backup.dir.
    assert not fresh.host.output(["ls", "-A", BACKUP_DIR])
    # The fresh host's own first push; then verify passes, remote-backup included.
    again = fresh.agent("backup")
    assert again.returncode == 0, again.stderr.decode()[-3000:]
    checks = fresh.verify()
    assert all(c["ok"] for c in checks.values()), checks
    print("offsite figures:", {k: round(v, 1) for k, v in FIGURES.items()})


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("wrong-password", "wrong repository password"),
        ("unreachable", "the remote cannot be reached"),
        ("full", "full"),
    ],
)
def test_a_failed_push_is_clear_keeps_the_local_backup_and_shows(
    hosts: tuple[Agent, Agent], remote: Remote, case: str, words: str
) -> None:
    _, fresh = hosts
    if case == "wrong-password":
        config = agent_config(fresh.ports, remote, password="restic-wrong.pass")
    elif case == "unreachable":
        config = agent_config(
            fresh.ports, remote, url=f"sftp://root@127.0.0.1:{free_port()}//srv/restic"
        )
    else:
        # Full but for 64 KiB: room for restic's repository files, not for the export.
        remote.host.run(["dd", "if=/dev/zero", "of=/srv/full/filler", "bs=1k", "count=960"])
        config = agent_config(fresh.ports, remote, url=remote.url("/srv/full/repo"))
    fresh.host.write(CONFIG, config, mode=0o600)
    try:
        before = fresh.backups()
        started = time.monotonic()
        done = fresh.agent("backup")
        seconds = time.monotonic() - started
        stderr = done.stderr.decode()
        assert done.returncode == 1, (done.stdout, stderr)
        assert words in stderr, stderr
        assert REPO_PASSWORD not in stderr and WRONG_PASSWORD not in stderr
        # The local backup was made and is kept.
        after = fresh.backups()
        assert len(after) == min(len(before) + 1, 3) and after[-1] not in before
        assert fresh.host.path(f"{BACKUP_DIR}/{after[-1]}/dataindex.json").is_file()
        assert f"backup: {BACKUP_DIR}/{after[-1]}" in done.stdout.decode()
        record = fresh.record()
        assert record["ok"] is False and words in str(record["error"])
        checks = fresh.verify()
        assert not checks["remote-backup"]["ok"]
        assert "failed" in str(checks["remote-backup"]["detail"]), checks["remote-backup"]
        print(f"offsite {case}: exit 1 after {seconds:.1f} s:\n{stderr}")
    finally:
        fresh.host.write(CONFIG, agent_config(fresh.ports, remote), mode=0o600)
