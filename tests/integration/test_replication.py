"""Replication (issue #7) on two real hosts: a primary and a replica, converged side by side.

The primary serves HTTPS with a company certificate (`tls = "files"`, a CA made with openssl) and
devpi's replication protocol on its replication port, for 127.0.0.1 only (every host shares this
machine's loopback). The replica trusts that CA (`primary_ca_file`), shares the primary's secret
(`secret_file`) and has its own Caddy with `tls internal` and the same users. Then: an upload to
the primary installs from the replica within a bounded time; an upload through the replica lands
on the primary; anyone else is kept off the replication port; `verify` reports the lag; with the
primary's devpi stopped the replica still installs what it holds and refuses uploads clearly;
started again, the primary's next upload reaches the replica.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agenthost import AGENT, CADDY_CA, CONFIG, DIST, ApplyRun, Ports, apply, config_text
from clients import Site, build_wheel, http_get, make_ca_bundle, pip_install, twine_upload
from nspawn import NspawnHost, free_port
from tlstools import make_pki, require

PASSWORD = "replica-Pw-3c9e71d0a2"
SECRET_FILE = "/etc/devpi-agent/replication.secret"
PRIMARY_CA_FILE = "/etc/devpi-agent/primary-ca.pem"
CERT_FILE = "/etc/ssl/devpi/pypi.pem"
KEY_FILE = "/etc/ssl/private/pypi.key"
# Every wait below is bounded; these are generous for a loaded 2-core machine.
REPLICATION_TIMEOUT = 60.0
CATCH_UP_TIMEOUT = 180.0


def with_devpi_settings(config: str, settings: str) -> str:
    """config_text() with more [devpi] settings."""
    head, sep, tail = config.partition("[devpi]\n")
    assert sep, config
    return f"{head}{sep}{settings}{tail}"


def primary_config(ports: Ports, replication_port: int) -> str:
    config = config_text(ports, PASSWORD).replace(
        'tls = "internal"', f'tls = "files"\ncert_file = "{CERT_FILE}"\nkey_file = "{KEY_FILE}"'
    )
    return with_devpi_settings(
        config,
        f'role = "primary"\nreplication_port = {replication_port}\n'
        f'replica_addresses = ["127.0.0.1"]\nsecret_file = "{SECRET_FILE}"\n',
    )


def replica_config(ports: Ports, replication_port: int) -> str:
    return with_devpi_settings(
        config_text(ports, PASSWORD),
        f'role = "replica"\nprimary_url = "https://127.0.0.1:{replication_port}"\n'
        f'primary_ca_file = "{PRIMARY_CA_FILE}"\nsecret_file = "{SECRET_FILE}"\n',
    )


@dataclass
class Pair:
    primary: NspawnHost
    replica: NspawnHost
    primary_ports: Ports
    replica_ports: Ports
    replication_port: int
    primary_apply: ApplyRun
    replica_apply: ApplyRun
    primary_site: Site
    replica_site: Site
    workdir: Path
    secret: str
    ca: Path


def in_background(work: Callable[[], ApplyRun]) -> Callable[[], ApplyRun]:
    """Start `work` in a thread; the returned function joins it and gives its result."""
    outcome: list[ApplyRun | BaseException] = []

    def target() -> None:
        try:
            outcome.append(work())
        except BaseException as error:  # handed to the joining thread
            outcome.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join() -> ApplyRun:
        thread.join(timeout=1500)
        assert outcome, "apply did not finish within 25 minutes"
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    return join


@pytest.fixture(scope="module")
def pair(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    assert DIST.exists(), f"{DIST} is missing: run `make dist` first"
    require("openssl")
    workdir = tmp_path_factory.mktemp("replication")
    pki = make_pki(workdir / "pki", "devpi-agent replication test CA")
    cert = pki.issue("primary", "IP:127.0.0.1", key="primary")
    secret = secrets.token_urlsafe(48)
    primary_ports, replica_ports, replication_port = Ports.free(), Ports.free(), free_port()
    primary, replica = NspawnHost(rootfs), NspawnHost(rootfs)
    try:
        for host in (primary, replica):
            host.prepare()
            host.copy_in(DIST, AGENT, mode=0o755)
            host.write(SECRET_FILE, secret + "\n", mode=0o600)
        primary.write(CONFIG, primary_config(primary_ports, replication_port), mode=0o600)
        # The server certificate, then its chain up to the company's root.
        primary.write(CERT_FILE, cert.read_bytes() + pki.ca.read_bytes())
        primary.copy_in(pki.key("primary"), KEY_FILE, mode=0o600)
        replica.write(CONFIG, replica_config(replica_ports, replication_port), mode=0o600)
        replica.copy_in(pki.ca, PRIMARY_CA_FILE)
        for host in (primary, replica):
            host.start(systemd=True)
        # Side by side, as an operator launching both at once would: the replica's first pull
        # waits (bounded) until the primary answers.
        primary_done = in_background(lambda: apply(primary))
        replica_apply = apply(replica)
        primary_apply = primary_done()
        bundle = make_ca_bundle(pki.ca, workdir / "primary-bundle.pem")
        primary_site = Site(
            "127.0.0.1", primary_ports.https, "devops/pypi", "devops", PASSWORD, bundle
        )
        replica_ca = replica.path(CADDY_CA)
        replica_bundle = (
            make_ca_bundle(replica_ca, workdir / "replica-bundle.pem")
            if replica_ca.exists()
            else workdir / "missing-replica-ca.pem"
        )
        replica_site = Site(
            "127.0.0.1", replica_ports.https, "devops/pypi", "devops", PASSWORD, replica_bundle
        )
        yield Pair(
            primary,
            replica,
            primary_ports,
            replica_ports,
            replication_port,
            primary_apply,
            replica_apply,
            primary_site,
            replica_site,
            workdir,
            secret,
            pki.ca,
        )
    except BaseException:
        for host in (primary, replica):
            print(host.debug_report())
        raise
    finally:
        for host in (primary, replica):
            host.stop()


def steps(run: ApplyRun) -> dict[str, str]:
    return {s["name"]: s["status"] for s in run.report["steps"]}  # type: ignore[union-attr]


def wait_for(ready: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> float:
    """Poll until ready() (bounded); the seconds it took."""
    started = time.monotonic()
    while not ready():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)
    return time.monotonic() - started


def listed(site: Site, project: str, filename: str) -> Callable[[], bool]:
    def ready() -> bool:
        status, body = http_get(
            site, f"/{site.index}/+simple/{project}/", auth=(site.user, site.password)
        )
        return status == 200 and filename in body

    return ready


def upload(site: Site, workdir: Path, name: str, version: str) -> Path:
    home = workdir / f"home-{name}-{site.port}"
    home.mkdir()
    wheel = build_wheel(workdir, name, version)
    run = twine_upload(site, wheel, home)
    assert run.returncode == 0, run.stdout + run.stderr
    return wheel


def installs(site: Site, workdir: Path, requirement: str) -> subprocess.CompletedProcess[str]:
    home = workdir / f"pip-{requirement}-{site.port}-{time.monotonic_ns()}"
    home.mkdir()
    return pip_install(site, home, home / "target", "--no-deps", requirement)


def verify(host: NspawnHost) -> dict[str, dict[str, object]]:
    run = host.run(["env", "-u", "HOME", AGENT, "verify", "--json"], check=False, timeout=300)
    document = json.loads(run.stdout)
    return {check["name"]: check for check in document["checks"]}


def test_both_converge(pair: Pair) -> None:
    for name, run in (("primary", pair.primary_apply), ("replica", pair.replica_apply)):
        assert run.returncode == 0, f"{name}: {run.stderr[-5000:]}"
        print(f"{name} first apply: {run.seconds:.1f} s wall")
    synced = [line for line in pair.replica_apply.stderr.splitlines() if "replica in sync" in line]
    assert synced, pair.replica_apply.stderr[-5000:]
    print(f"replica's first sync: {synced[0]}")
    assert steps(pair.replica_apply)["devpi-users"] == "ok"
    assert "users and indexes come from the primary" in pair.replica_apply.stderr
    again = apply(pair.replica)
    assert again.returncode == 0 and again.report["changed"] == 0, again.stderr[-5000:]
    print(f"replica no-op apply: {again.seconds:.1f} s wall")


def test_secret_is_shared_and_never_logged(pair: Pair) -> None:
    for host in (pair.primary, pair.replica):
        secret = host.path("/var/lib/devpi/secret")
        assert secret.read_text() == pair.secret + "\n"
        assert secret.stat().st_mode & 0o777 == 0o600
        logs = host.output(["sh", "-c", "cat /var/log/devpi-agent/*.log /var/log/supervisor/*"])
        assert pair.secret not in logs
    for run in (pair.primary_apply, pair.replica_apply):
        assert pair.secret not in run.stdout + run.stderr


def test_upload_to_primary_installs_from_replica(pair: Pair) -> None:
    wheel = upload(pair.primary_site, pair.workdir, "replicated-canary", "1.0.0")
    seconds = wait_for(
        listed(pair.replica_site, "replicated-canary", wheel.name),
        REPLICATION_TIMEOUT,
        "the upload to the primary listed on the replica",
    )
    print(f"replication delay (upload done -> listed on the replica): {seconds:.2f} s")
    run = installs(pair.replica_site, pair.workdir, "replicated-canary==1.0.0")
    assert run.returncode == 0, run.stdout + run.stderr


def test_upload_through_replica_lands_on_primary(pair: Pair) -> None:
    wheel = upload(pair.replica_site, pair.workdir, "relayed-canary", "1.0.0")
    # devpi relays the upload and answers once the change came back: both list it at once.
    assert listed(pair.primary_site, "relayed-canary", wheel.name)()
    assert listed(pair.replica_site, "relayed-canary", wheel.name)()


def get_status(
    port: int, path: str, headers: dict[str, str], ca: Path, source: str = "127.0.0.1"
) -> int:
    """GET over HTTPS from a chosen loopback source address (what Caddy's remote_ip sees)."""
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), 30, source_address=(source, 0)) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        status_line = sock.makefile("rb").readline().decode()
    return int(status_line.split()[1])


def test_replication_port_admits_replicas_only(pair: Pair) -> None:
    port = pair.replication_port
    bogus_token = {"Authorization": "Bearer not-signed", "X-Devpi-Replica-Uuid": "x"}
    # Not a replica address: refused whatever it sends.
    assert get_status(port, "/+api", {}, pair.ca, source="127.0.0.2") == 403
    assert get_status(port, "/+changelog/0-", bogus_token, pair.ca, source="127.0.0.2") == 403
    # A replica address without a replica's token needs basic auth like any user.
    assert get_status(port, "/+api", {}, pair.ca) == 401
    # A token devpi did not sign gets nothing: not the changelog, not a file.
    assert get_status(port, "/+changelog/0-", bogus_token, pair.ca) in (400, 403)
    page = http_get(
        pair.primary_site, "/devops/pypi/+simple/replicated-canary/", auth=("devops", PASSWORD)
    )[1]
    found = re.search(r'href="\.\./\.\./(\+f/[^"#]+)', page)
    assert found, page
    file_path = f"/devops/pypi/{found[1]}"
    assert get_status(port, file_path, bogus_token, pair.ca) == 403
    assert get_status(port, file_path, {}, pair.ca) == 401
    # The main sites keep the changelog closed to everyone.
    auth = ("devops", PASSWORD)
    assert http_get(pair.primary_site, "/+changelog/0", auth=auth)[0] == 403
    assert http_get(pair.replica_site, "/+changelog/0", auth=auth)[0] == 403


def test_verify_reports_replication(pair: Pair) -> None:
    replica = verify(pair.replica)
    primary = verify(pair.primary)
    for name, report in (("replica", replica), ("primary", primary)):
        bad = {k: v["detail"] for k, v in report.items() if not v["ok"]}
        assert not bad, f"{name}: {bad}"
    print(f"replica: {replica['replication']['detail']}")
    print(f"primary: {primary['replication']['detail']}")
    assert "lag 0" in str(replica["replication"]["detail"])
    assert "127.0.0.1" in str(primary["replication"]["detail"])


def devpi_answers(port: int) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/+api", timeout=5) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    return ready


def test_replica_serves_while_primary_is_down_then_catches_up(pair: Pair) -> None:
    pair.primary.run(["supervisorctl", "stop", "devpi-server"], timeout=120)
    try:
        run = installs(pair.replica_site, pair.workdir, "replicated-canary==1.0.0")
        assert run.returncode == 0, run.stdout + run.stderr

        home = pair.workdir / "home-refused"
        home.mkdir()
        refused = twine_upload(
            pair.replica_site, build_wheel(pair.workdir, "while-down", "1.0.0"), home
        )
        assert refused.returncode != 0
        assert "503" in refused.stdout + refused.stderr
        context = ssl.create_default_context(cafile=str(pair.replica_site.ca_bundle))
        request = urllib.request.Request(
            pair.replica_site.index_url, data=b"", method="POST",
            headers={"Authorization": "Basic " + basic("devops", PASSWORD)},
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, context=context, timeout=60)
        message = caught.value.read().decode()
        assert caught.value.code == 503
        assert "read replica" in message and "primary" in message
        print(f"upload to the replica, primary down: 503 {message!r}")

        down = verify(pair.replica)["replication"]
        assert not down["ok"]
        assert "does not answer" in str(down["detail"])
    finally:
        pair.primary.run(["supervisorctl", "start", "devpi-server"], timeout=180)
    wait_for(devpi_answers(pair.primary_ports.devpi), 180, "the primary's devpi back", 0.5)

    wheel = upload(pair.primary_site, pair.workdir, "after-restart", "1.0.0")
    seconds = wait_for(
        listed(pair.replica_site, "after-restart", wheel.name),
        CATCH_UP_TIMEOUT,
        "the replica catching up after the primary's restart",
        0.25,
    )
    print(f"catch-up after the primary's restart (upload done -> listed on the replica): "
          f"{seconds:.1f} s")  # fmt: skip
    run = installs(pair.replica_site, pair.workdir, "after-restart==1.0.0")
    assert run.returncode == 0, run.stdout + run.stderr


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()
