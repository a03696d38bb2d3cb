"""Day-2 operations on real hosts, driven with the real clients: verify, client-config, password
rotation, backups (the timer and the command), restore on a fresh host, prune, upgrades.

Host A is converged once, with devpi-server one release behind the default and
`upgrade = "export-import"`, so the same host later proves an upgrade by export and import (and
its fallback). The tests run in file order and build on each other's state; host B is a fresh
host for the restore. The host is broken on purpose only at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from agenthost import AGENT, CADDY_CA, CONFIG, DIST, PACKAGE, ApplyRun, Ports, apply
from clients import (
    VENV_BIN,
    Site,
    build_wheel,
    http_get,
    make_ca_bundle,
    pip_install,
    twine_upload,
)
from nspawn import NspawnHost

OLD_SERVER = "6.19.3"
NEW_SERVER = "6.20.3"  # the agent's default pin
DEVOPS_PASSWORD = "devops-Pw-1 with $pace&'quote!"
DEVOPS_ROTATED = "devops-Pw-2/rotated%`tick\\"
CI_PASSWORD = "ci-Pw-1-3c5e7a9b"
CI_ROTATED = "ci-Pw-2-d2f4b6a8"
CI_PASSWORD_FILE = "/etc/devpi-agent/ci.pass"
CHECKS = {
    "supervisor",
    "devpi-server",
    "caddy",
    "proxy-api",
    "basic-auth",
    "tls-certificate",
    "devpi-loopback",
    "root-password",
    "secret-file",
    "private-files",
    "devpi-user",
    "changelog-closed",
    "disk-space",
}


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def day2_config(
    ports: Ports,
    *,
    devops_password: str = DEVOPS_PASSWORD,
    server_version: str = OLD_SERVER,
    with_ci: bool = True,
    prune: bool = False,
) -> str:
    text = f"""
[server]
domain = "127.0.0.1"
https_port = {ports.https}
http_port = 0
tls = "internal"

[devpi]
port = {ports.devpi}
server_version = "{server_version}"
# Versions other than the agent's default pins are not in the shipped lock.
unlocked = {str(server_version != NEW_SERVER).lower()}
upgrade = "export-import"
prune = {str(prune).lower()}

[backup]
keep = 2

[[users]]
name = "devops"
password = {toml_string(devops_password)}

[[indexes]]
name = "devops/pypi"
bases = ["root/pypi"]
"""
    if with_ci:
        text += f"""
[[users]]
name = "ci"
password_file = "{CI_PASSWORD_FILE}"

[[indexes]]
name = "ci/dev"
bases = ["devops/pypi"]
"""
    return text


@dataclass
class Day2:
    host: NspawnHost
    ports: Ports
    first: ApplyRun
    workdir: Path
    ca_bundle: Path
    devops_password: str = DEVOPS_PASSWORD
    # index -> {file name: sha256} of everything uploaded so far
    uploads: dict[str, dict[str, str]] = field(default_factory=dict)

    def site(self, user: str = "devops", password: str | None = None, index: str = "") -> Site:
        password = self.devops_password if password is None else password
        return Site(
            "127.0.0.1",
            self.ports.https,
            index or f"{user}/pypi",
            user,
            password,
            self.ca_bundle,
        )

    def agent(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return self.host.run(["env", "-u", "HOME", AGENT, *args], input=input, check=False)

    def reconfigure(self, **changes: object) -> None:
        self.host.write(CONFIG, day2_config(self.ports, **changes), mode=0o600)  # type: ignore[arg-type]

    def home(self, name: str) -> Path:
        home = self.workdir / name
        home.mkdir()
        return home

    def upload(
        self, site: Site, version: str, name: str = PACKAGE
    ) -> subprocess.CompletedProcess[str]:
        directory = self.workdir / f"wheels-{site.user}-{version}"
        directory.mkdir(exist_ok=True)
        wheel = build_wheel(directory, name, version)
        home = self.workdir / f"upload-{site.user}-{version}-{len(os.listdir(self.workdir))}"
        home.mkdir()
        result = twine_upload(site, wheel, home)
        if result.returncode == 0:
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            self.uploads.setdefault(site.index, {})[wheel.name] = digest
        return result


def start_host(rootfs: Path, config: str) -> NspawnHost:
    host = NspawnHost(rootfs)
    host.prepare()
    host.copy_in(DIST, AGENT, mode=0o755)
    host.write(CONFIG, config, mode=0o600)
    host.write(CI_PASSWORD_FILE, CI_PASSWORD + "\n", mode=0o600)
    host.start(systemd=True)
    return host


@dataclass
class FreshHost:
    """Host B, for the restore: converged in the background while host A's tests run."""

    host: NspawnHost
    ports: Ports
    thread: threading.Thread
    runs: list[ApplyRun] = field(default_factory=list)

    def converged(self) -> ApplyRun:
        self.thread.join(timeout=1200)
        assert self.runs, "host B's apply did not finish"
        return self.runs[0]


@pytest.fixture(scope="module")
def restore_target(rootfs: Path) -> Iterator[FreshHost]:
    assert DIST.exists(), f"{DIST} is missing: run `make dist` first"
    ports = Ports.free()
    host = start_host(rootfs, day2_config(ports, server_version=NEW_SERVER))
    runs: list[ApplyRun] = []
    thread = threading.Thread(target=lambda: runs.append(apply(host)), daemon=True)
    thread.start()
    try:
        yield FreshHost(host, ports, thread, runs)
    finally:
        thread.join(timeout=1200)
        host.stop()


@pytest.fixture(scope="module")
def day2(
    rootfs: Path, tmp_path_factory: pytest.TempPathFactory, restore_target: FreshHost
) -> Iterator[Day2]:
    ports = Ports.free()
    workdir = tmp_path_factory.mktemp("day2")
    host = start_host(rootfs, day2_config(ports))
    try:
        first = apply(host)
        assert first.returncode == 0, first.stderr[-5000:]
        bundle = make_ca_bundle(host.path(CADDY_CA), workdir / "ca-bundle.pem")
        yield Day2(host, ports, first, workdir, bundle)
    except BaseException:
        print(host.debug_report())
        raise
    finally:
        host.stop()


def verify_report(host_run: subprocess.CompletedProcess[bytes]) -> dict[str, dict[str, object]]:
    document = json.loads(host_run.stdout)
    return {check["name"]: check for check in document["checks"]}


def failed_checks(report: dict[str, dict[str, object]]) -> set[str]:
    return {name for name, check in report.items() if not check["ok"]}


def served_files(site: Site, index: str) -> dict[str, str]:
    """File name -> sha256 of the bytes Caddy serves for every release file uploaded to `index`."""
    context = ssl.create_default_context(cafile=str(site.ca_bundle))
    auth = (site.user, site.password)
    status, body = http_get(site, f"/{index}", auth=auth, accept="application/json")
    assert status == 200, body
    files: dict[str, str] = {}
    for project in json.loads(body)["result"]["projects"]:
        status, body = http_get(site, f"/{index}/{project}", auth=auth, accept="application/json")
        assert status == 200, body
        for version in json.loads(body)["result"].values():
            for link in version.get("+links", []):
                if link.get("rel") != "releasefile" or f"/{index}/+f/" not in link["href"]:
                    continue
                request = urllib.request.Request(link["href"])
                request.add_header("Authorization", _basic(*auth))
                with urllib.request.urlopen(request, context=context, timeout=60) as response:
                    data = response.read()
                files[link["href"].rsplit("/", 1)[-1]] = hashlib.sha256(data).hexdigest()
    return files


def _basic(user: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def client_env(home: Path) -> dict[str, str]:
    """A client with nothing pointing at the server's CA: the pasted settings must do it."""
    return {
        "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
        "UV_NO_CACHE": "1",
    }


# --- verify -----------------------------------------------------------------------------------


def test_verify_passes_on_a_converged_host(day2: Day2) -> None:
    run = day2.agent("verify", "--json")
    report = verify_report(run)
    assert set(report) == CHECKS
    assert run.returncode == 0, report
    assert "127.0.0.1" in str(report["tls-certificate"]["detail"])
    table = day2.agent("verify")
    assert table.returncode == 0
    assert f"verify: {len(CHECKS)} ok, 0 failed" in table.stdout.decode()


# --- client-config ----------------------------------------------------------------------------


def test_client_config_pasted_into_bash_makes_twine_pip_and_uv_work(day2: Day2) -> None:
    out = day2.agent("client-config", "--user", "devops")
    assert out.returncode == 0, out.stderr
    settings = out.stdout.decode()
    assert "/devops/pypi/+simple/" in settings and "repository = https://127.0.0.1:" in settings
    home = day2.home("bash-client")
    wheel = build_wheel(day2.workdir, PACKAGE, "1.0.0")
    target = home / "target"
    script = (
        settings
        + f"\ntwine upload --non-interactive -r devpi {wheel}"
        + f"\npython -m pip install --no-cache-dir --target {target}/pip {PACKAGE}==1.0.0 six"
        + f"\nuv pip install --target {target}/uv {PACKAGE}==1.0.0\n"
    )
    run = subprocess.run(
        ["bash", "-e"],
        input=script,
        env=client_env(home),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    day2.uploads.setdefault("devops/pypi", {})[wheel.name] = hashlib.sha256(
        wheel.read_bytes()
    ).hexdigest()
    assert (target / "pip" / "devpi_agent_canary" / "__init__.py").exists()
    assert (target / "pip" / "six.py").exists()
    assert (target / "uv" / "devpi_agent_canary" / "__init__.py").exists()


def test_client_config_for_fish(day2: Day2) -> None:
    out = day2.agent("client-config", "--user", "devops", "--format", "all", "--shell", "fish")
    assert out.returncode == 0, out.stderr
    settings = out.stdout.decode()
    assert "set -gx UV_DEFAULT_INDEX" in settings
    home = day2.home("fish-client")
    target = home / "target"
    script = (
        settings
        + f"\nuv pip install --target {target}/uv {PACKAGE}==1.0.0; or exit 1"
        + f"\npython -m pip install --no-cache-dir --target {target}/pip {PACKAGE}==1.0.0\n"
    )
    run = subprocess.run(
        ["fish", "-c", script],
        env=client_env(home),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (target / "uv" / "devpi_agent_canary" / "__init__.py").exists()
    assert (target / "pip" / "devpi_agent_canary" / "__init__.py").exists()


def test_client_config_refuses_an_unknown_user(day2: Day2) -> None:
    out = day2.agent("client-config", "--user", "nobody")
    assert out.returncode == 2
    assert "nobody" in out.stderr.decode() and out.stdout == b""


# --- password rotation ------------------------------------------------------------------------


def test_rotating_an_inline_password_in_one_apply(day2: Day2) -> None:
    old = day2.site()
    day2.reconfigure(devops_password=DEVOPS_ROTATED)
    run = apply(day2.host)
    assert run.returncode == 0, run.stderr[-3000:]
    day2.devops_password = DEVOPS_ROTATED
    new = day2.site()

    refused = day2.upload(old, "2.0.0")
    assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr
    home = day2.home("rotation-old")
    assert pip_install(old, home, home / "t", f"{PACKAGE}==1.0.0").returncode != 0
    assert http_get(old, "/+api", auth=("devops", DEVOPS_PASSWORD))[0] == 401

    accepted = day2.upload(new, "2.0.0")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    home = day2.home("rotation-new")
    installed = pip_install(new, home, home / "t", f"{PACKAGE}==2.0.0")
    assert installed.returncode == 0, installed.stdout + installed.stderr


def test_rotating_a_password_file_with_passwd(day2: Day2) -> None:
    old = day2.site("ci", CI_PASSWORD, "ci/dev")
    assert day2.upload(old, "1.0.0", "ci-canary").returncode == 0
    inline = day2.agent("passwd", "devops", "--stdin", input=b"whatever-123\n")
    assert inline.returncode == 2 and b"inline" in inline.stderr
    changed = day2.agent("passwd", "ci", "--stdin", input=CI_ROTATED.encode() + b"\n")
    assert changed.returncode == 0, changed.stderr
    assert CI_ROTATED.encode() not in changed.stdout + changed.stderr
    assert day2.host.output(["stat", "-c", "%a %U", CI_PASSWORD_FILE]) == "600 root"
    run = apply(day2.host)
    assert run.returncode == 0, run.stderr[-3000:]

    new = day2.site("ci", CI_ROTATED, "ci/dev")
    refused = day2.upload(old, "2.0.0", "ci-canary")
    assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr
    assert http_get(old, "/+api", auth=("ci", CI_PASSWORD))[0] == 401
    accepted = day2.upload(new, "2.0.0", "ci-canary")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    home = day2.home("ci-install")
    installed = pip_install(new, home, home / "t", "ci-canary==2.0.0")
    assert installed.returncode == 0, installed.stdout + installed.stderr


# --- backups ----------------------------------------------------------------------------------


BACKUP_DIR = "/var/backups/devpi"


def backup_names(host: NspawnHost) -> list[str]:
    return sorted(host.output(["ls", "-A", BACKUP_DIR]).split())


def test_backup_timer_and_command_keep_the_newest(day2: Day2) -> None:
    host = day2.host
    assert host.output(["systemctl", "is-active", "devpi-agent-backup.timer"]) == "active"
    host.run(["systemctl", "start", "devpi-agent-backup.service"], timeout=600)
    by_timer = backup_names(host)
    assert len(by_timer) == 1 and re.fullmatch(r"\d{8}T\d{6}Z", by_timer[0]), by_timer
    for _ in range(2):
        run = day2.agent("backup", "--json")
        assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    names = backup_names(host)
    assert len(names) == 2 and by_timer[0] not in names, names  # keep = 2: the oldest went
    assert result["path"] == f"{BACKUP_DIR}/{names[-1]}"
    assert host.output(["stat", "-c", "%a %U", BACKUP_DIR]) == "700 devpi"
    # The export holds every uploaded file, byte for byte.
    newest = host.path(f"{BACKUP_DIR}/{names[-1]}")
    exported = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in newest.rglob("*.whl")}
    for index, files in day2.uploads.items():
        for name, digest in files.items():
            assert exported.get(name) == digest, (index, name)


# --- restore on a fresh host ------------------------------------------------------------------


def test_restore_on_a_fresh_host_gives_back_every_file(
    day2: Day2, restore_target: FreshHost
) -> None:
    newest = backup_names(day2.host)[-1]
    other, ports = restore_target.host, restore_target.ports
    try:
        converged = restore_target.converged()
        assert converged.returncode == 0, converged.stderr[-3000:]
        source = day2.host.path(f"{BACKUP_DIR}/{newest}")
        for path in source.rglob("*"):
            if path.is_file():
                other.copy_in(path, f"/root/restore-me/{path.relative_to(source)}", mode=0o600)
        run = other.run(["env", "-u", "HOME", AGENT, "restore", "/root/restore-me"], check=False)
        assert run.returncode == 0, run.stdout.decode() + run.stderr.decode()[-3000:]

        bundle = make_ca_bundle(other.path(CADDY_CA), day2.workdir / "ca-bundle-b.pem")
        for index, files in day2.uploads.items():
            user = index.split("/")[0]
            # The restore set host B's configured passwords again.
            password = DEVOPS_PASSWORD if user == "devops" else CI_PASSWORD
            site = Site("127.0.0.1", ports.https, index, user, password, bundle)
            assert served_files(site, index) == files, index

        verified = other.run(["env", "-u", "HOME", AGENT, "verify", "--json"], check=False)
        assert verified.returncode == 0, verify_report(verified)
        again = other.run(["env", "-u", "HOME", AGENT, "restore", "/root/restore-me"], check=False)
        assert again.returncode == 1 and b"already holds uploads" in again.stderr
    except BaseException:
        print(other.debug_report())
        raise


# --- prune ------------------------------------------------------------------------------------


def test_prune_deletes_what_the_config_dropped_only_when_asked(day2: Day2) -> None:
    host = day2.host
    day2.reconfigure(devops_password=DEVOPS_ROTATED, with_ci=False)
    kept = apply(host)
    assert kept.returncode == 0, kept.stderr[-3000:]
    site = day2.site()
    assert (
        http_get(site, "/ci/dev", auth=("devops", DEVOPS_ROTATED), accept="application/json")[0]
        == 200
    )

    day2.reconfigure(devops_password=DEVOPS_ROTATED, with_ci=False, prune=True)
    plan = host.run(["env", "-u", "HOME", AGENT, "plan"], check=False)
    planned = plan.stdout.decode()
    assert "would delete index ci/dev" in planned and "would delete devpi user ci" in planned
    assert (
        http_get(site, "/ci/dev", auth=("devops", DEVOPS_ROTATED), accept="application/json")[0]
        == 200
    )
    pruned = apply(host)
    assert pruned.returncode == 0, pruned.stderr[-3000:]
    assert (
        http_get(site, "/ci", auth=("devops", DEVOPS_ROTATED), accept="application/json")[0] == 404
    )
    assert http_get(site, "/+api", auth=("ci", CI_ROTATED))[0] == 401
    assert http_get(site, "/devops/pypi", auth=("devops", DEVOPS_ROTATED))[0] == 200
    day2.uploads.pop("ci/dev", None)


# --- upgrades ---------------------------------------------------------------------------------


def venv_server_version(host: NspawnHost) -> str:
    found = host.output(
        ["sh", "-c", "ls -d /opt/devpi-agent/venv/lib/python3*/site-packages/devpi_server-*"]
    )
    return found.rsplit("devpi_server-", 1)[1].removesuffix(".dist-info")


def test_upgrade_by_export_and_import_keeps_every_package(day2: Day2) -> None:
    host = day2.host
    assert venv_server_version(host) == OLD_SERVER
    day2.reconfigure(devops_password=DEVOPS_ROTATED, with_ci=False, server_version=NEW_SERVER)
    run = apply(host)
    assert run.returncode == 0, run.stderr[-5000:]
    steps = {s["name"]: s["status"] for s in run.report["steps"]}  # type: ignore[union-attr]
    assert steps["devpi-upgrade"] == "changed", run.report
    print(f"upgrade {OLD_SERVER} -> {NEW_SERVER} by export/import: apply took {run.seconds:.1f} s")
    assert venv_server_version(host) == NEW_SERVER
    kept = host.output(["sh", "-c", "ls -d /var/lib/devpi/server.* /var/lib/devpi/export-*"])
    assert f"server.{OLD_SERVER}-" in kept and f"export-{OLD_SERVER}-" in kept, kept
    assert not host.path("/opt/devpi-agent/venv.previous-" + OLD_SERVER).exists()
    site = day2.site()
    assert served_files(site, "devops/pypi") == day2.uploads["devops/pypi"]
    # A second apply changing nothing is checked after the next test's fallback.


def test_a_failed_upgrade_falls_back_to_the_old_versions(day2: Day2) -> None:
    host = day2.host
    day2.reconfigure(devops_password=DEVOPS_ROTATED, with_ci=False, server_version="6.99.0")
    run = apply(host)
    assert run.returncode == 1, run.stderr[-3000:]
    assert f"devpi-server {NEW_SERVER} runs again" in run.stderr
    assert venv_server_version(host) == NEW_SERVER
    assert served_files(day2.site(), "devops/pypi") == day2.uploads["devops/pypi"]
    day2.reconfigure(devops_password=DEVOPS_ROTATED, with_ci=False, server_version=NEW_SERVER)
    back = apply(host)
    assert back.returncode == 0 and back.report["changed"] == 0, back.report


# --- verify on a host broken on purpose -------------------------------------------------------

_EMPTY_ROOT_PASSWORD = """
import base64, json, sys, urllib.request
port, password = sys.argv[1], open("/etc/devpi-agent/root.pass").read().strip()
def call(method, path, body, auth=None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
        data=json.dumps(body).encode(), headers={"Content-Type": "application/json",
        "Accept": "application/json"})
    if auth:
        request.add_header("X-Devpi-Auth", auth)
    return json.load(urllib.request.urlopen(request))
token = call("POST", "/+login", {"user": "root", "password": password})["result"]["password"]
call("PATCH", "/root", {"password": ""}, base64.b64encode(f"root:{token}".encode()).decode())
"""


def test_verify_names_each_broken_thing(day2: Day2) -> None:
    host = day2.host
    host.run(["chmod", "0644", "/var/lib/devpi/secret"])
    host.run(["python3", "-c", _EMPTY_ROOT_PASSWORD, str(day2.ports.devpi)])
    run = day2.agent("verify", "--json")
    assert run.returncode == 1
    report = verify_report(run)
    assert failed_checks(report) == {"secret-file", "root-password"}, report
    assert "0644" in str(report["secret-file"]["detail"])
    assert "EMPTY" in str(report["root-password"]["detail"])

    host.run(["supervisorctl", "stop", "devpi-server"])
    stopped = verify_report(day2.agent("verify", "--json"))
    assert {"supervisor", "devpi-server", "proxy-api"} <= failed_checks(stopped), stopped
    assert "STOPPED" in str(stopped["supervisor"]["detail"])
