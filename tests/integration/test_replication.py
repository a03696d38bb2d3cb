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
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
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
REPLICA_NAME = "replica-1"
# Where the primary's agent puts the certificate it issued, and where the replica is given it.
ISSUED_CERT = f"/etc/devpi-agent/replicas/{REPLICA_NAME}.pem"
REPLICA_CERT_FILE = "/etc/devpi-agent/replica.pem"
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
        f'replica_addresses = ["127.0.0.1"]\nsecret_file = "{SECRET_FILE}"\n'
        f'replicas = ["{REPLICA_NAME}"]\n',
    )


def replica_config(ports: Ports, replication_port: int, proxy_port: int) -> str:
    return with_devpi_settings(
        config_text(ports, PASSWORD),
        f'role = "replica"\nprimary_url = "https://127.0.0.1:{replication_port}"\n'
        f'primary_ca_file = "{PRIMARY_CA_FILE}"\nsecret_file = "{SECRET_FILE}"\n'
        f'replica_cert_file = "{REPLICA_CERT_FILE}"\nprimary_proxy_port = {proxy_port}\n',
    )


@dataclass
class Pair:
    primary: NspawnHost
    replica: NspawnHost
    primary_ports: Ports
    replica_ports: Ports
    replication_port: int
    proxy_port: int
    primary_apply: ApplyRun
    replica_apply: ApplyRun
    primary_site: Site
    replica_site: Site
    workdir: Path
    secret: str
    ca: Path


@pytest.fixture(scope="module")
def pair(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    assert DIST.exists(), f"{DIST} is missing: run `make dist` first"
    require("openssl")
    workdir = tmp_path_factory.mktemp("replication")
    pki = make_pki(workdir / "pki", "devpi-agent replication test CA")
    cert = pki.issue("primary", "IP:127.0.0.1", key="primary")
    secret = secrets.token_urlsafe(48)
    primary_ports, replica_ports = Ports.free(), Ports.free()
    replication_port, proxy_port = free_port(), free_port()
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
        replica.write(
            CONFIG, replica_config(replica_ports, replication_port, proxy_port), mode=0o600
        )
        replica.copy_in(pki.ca, PRIMARY_CA_FILE)
        for host in (primary, replica):
            host.start(systemd=True)
        # The operator's order: the primary first (it issues the replica's certificate), the
        # certificate copied to the replica, then the replica.
        primary_apply = apply(primary)
        issued = primary.path(ISSUED_CERT)
        assert issued.exists(), primary_apply.stderr[-5000:]
        replica.copy_in(issued, REPLICA_CERT_FILE, mode=0o600)
        replica_apply = apply(replica)
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
            proxy_port,
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


REFUSED = "TLS refused"


def raw_get(
    port: int,
    path: str,
    headers: Sequence[tuple[str, str]],
    ca: Path,
    source: str = "127.0.0.1",
    cert: Path | None = None,
) -> tuple[int | str, str]:
    """GET over HTTPS from a chosen loopback source address (what Caddy's remote_ip sees), with
    headers exactly as given (repeats included) and an optional client certificate. Returns
    the status and body, or REFUSED when the server ends the TLS connection."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert))
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    try:
        with (
            socket.create_connection(("127.0.0.1", port), 30, source_address=(source, 0)) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
        ):
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            data = sock.makefile("rb").read()
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return REFUSED, ""
    if not data:
        return REFUSED, ""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode("utf-8", "replace")


# The review's tricks for getting past the replication site as a replica: a bearer token Caddy
# cannot check, headers Caddy's matcher sees but reverse_proxy drops (hop-by-hop) or that
# waitress joins, case and spacing variants, garbage tokens.
FORGED_HEADERS: dict[str, list[tuple[str, str]]] = {
    "nothing": [],
    "bearer and uuid": [("Authorization", "Bearer x"), ("X-Devpi-Replica-Uuid", "x")],
    "lower case": [("authorization", "bearer x"), ("x-devpi-replica-uuid", "x")],
    "spacing": [("Authorization", "Bearer    x  "), ("X-Devpi-Replica-Uuid", "  x")],
    "hop-by-hop": [
        ("Authorization", "Bearer x"),
        ("X-Devpi-Replica-Uuid", "x"),
        ("Connection", "close, Authorization, X-Devpi-Replica-Uuid"),
    ],
    "two Authorization headers": [
        ("Authorization", "Bearer x"),
        ("Authorization", "Basic " + base64.b64encode(b"devops:wrong").decode()),
        ("X-Devpi-Replica-Uuid", "x"),
    ],
    "garbage token": [
        ("Authorization", "Bearer " + secrets.token_urlsafe(120)),
        ("X-Devpi-Replica-Uuid", secrets.token_hex(16)),
    ],
}


def leaks(
    port: int, paths: dict[str, str], ca: Path, source: str, cert: Path | None = None
) -> tuple[list[str], list[str]]:
    """Every forged request against every private path; what got through, and all outcomes."""
    through, seen = [], []
    for trick, headers in FORGED_HEADERS.items():
        for what, path in paths.items():
            status, body = raw_get(port, path, headers, ca, source, cert)
            seen.append(f"{trick} -> {what}: {status}")
            if status not in (REFUSED, 400, 401, 403, 421):
                through.append(f"{trick} -> {what} {path}: {status} {body[:200]!r}")
    return through, seen


def private_paths(pair: Pair) -> dict[str, str]:
    page = http_get(
        pair.primary_site, "/devops/pypi/+simple/replicated-canary/", auth=("devops", PASSWORD)
    )[1]
    found = re.search(r'href="\.\./\.\./(\+f/[^"#]+)', page)
    assert found, page
    return {
        "changelog": "/+changelog/0-",
        "private +simple page": "/devops/pypi/+simple/replicated-canary/",
        "index JSON": "/devops/pypi",
        "file": f"/devops/pypi/{found[1]}",
    }


def openssl(*args: str, cwd: Path) -> None:
    require("openssl")
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=cwd)


def forged_certificates(workdir: Path) -> list[Path]:
    """Client certificates with the replica's name that the primary never issued: one
    self-signed, one from another CA (as another primary's agent would have made)."""
    work = workdir / "forged"
    work.mkdir()
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    subject = f"/CN=devpi replica {REPLICA_NAME}"
    openssl("req", "-x509", *ec, "-keyout", "self.key", "-out", "self.crt", "-days", "2",
            "-subj", subject, cwd=work)  # fmt: skip
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=devpi-agent replication CA 00000000",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign", cwd=work)  # fmt: skip
    openssl("req", "-new", *ec, "-keyout", "other.key", "-out", "other.csr", "-subj", subject,
            cwd=work)  # fmt: skip
    (work / "ext.cnf").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    openssl("x509", "-req", "-in", "other.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-set_serial", "7", "-days", "2", "-extfile", "ext.cnf", "-out", "other.crt",
            cwd=work)  # fmt: skip
    bundles = []
    for name in ("self", "other"):
        bundle = work / f"{name}.pem"
        bundle.write_bytes(
            (work / f"{name}.crt").read_bytes() + (work / f"{name}.key").read_bytes()
        )
        bundles.append(bundle)
    return bundles


def test_replication_port_refuses_forged_replicas(pair: Pair) -> None:
    port = pair.replication_port
    paths = private_paths(pair)
    issued = pair.primary.path(ISSUED_CERT)
    through, seen = [], []
    # From an allowed address and from another: without a certificate, with a self-signed one
    # and with one from another CA, both in the replica's name.
    forged = forged_certificates(pair.workdir)
    for source in ("127.0.0.1", "127.0.0.2"):
        for cert in (None, *forged):
            got, outcomes = leaks(port, paths, pair.ca, source, cert)
            through += got
            seen += [f"{source} {cert.name if cert else 'no cert'}: {o}" for o in outcomes]
    # The real replica certificate from an address not in replica_addresses.
    got, outcomes = leaks(port, paths, pair.ca, "127.0.0.2", issued)
    through += got
    seen += [f"127.0.0.2 issued cert: {o}" for o in outcomes]
    print("\n".join(seen))
    assert not through, "\n".join(through)
    # A request with none of the issued certificates never reaches HTTP at all.
    assert raw_get(port, "/+api", [], pair.ca)[0] == REFUSED
    for cert in forged:
        assert raw_get(port, "/+api", [], pair.ca, cert=cert)[0] == REFUSED, cert.name
    # The control: the same request with the issued certificate from the replica's address is
    # served, so the refusals above are the certificate's doing.
    assert raw_get(port, "/+api", [], pair.ca, cert=issued)[0] == 200
    # devpi still checks its own signature on the changelog behind the certificate.
    changelog = raw_get(port, "/+changelog/0-", FORGED_HEADERS["bearer and uuid"], pair.ca,
                        cert=issued)  # fmt: skip
    assert changelog[0] in (400, 403), changelog
    # The main sites keep the changelog closed to everyone.
    auth = ("devops", PASSWORD)
    assert http_get(pair.primary_site, "/+changelog/0", auth=auth)[0] == 403
    assert http_get(pair.replica_site, "/+changelog/0", auth=auth)[0] == 403


def test_replica_proxy_listens_on_loopback_only(pair: Pair) -> None:
    # Every test host shares this machine's network namespace: its `ss` sees the replica's
    # sockets.
    listening = subprocess.run(
        ["ss", "-Htln", f"sport = :{pair.proxy_port}"], check=True, capture_output=True, text=True
    ).stdout
    addresses = {line.split()[3] for line in listening.splitlines() if line.strip()}
    assert addresses == {f"127.0.0.1:{pair.proxy_port}"}, listening
    # What a local user of the replica host reaches through it is what devpi serves anonymously;
    # devpi keeps the changelog to signed requests.
    status, _ = raw_http(pair.proxy_port, "/+changelog/0-", FORGED_HEADERS["bearer and uuid"])
    assert status in (400, 403)


def test_a_revoked_replica_is_locked_out(pair: Pair) -> None:
    """Removing the name from devpi.replicas locks its certificate out at the next apply."""
    issued = pair.workdir / "revoked.pem"
    issued.write_bytes(pair.primary.path(ISSUED_CERT).read_bytes())
    config = pair.primary.path(CONFIG).read_text()
    revoked = config.replace(f'replicas = ["{REPLICA_NAME}"]', 'replicas = ["replica-2"]')
    assert revoked != config
    pair.primary.write(CONFIG, revoked, mode=0o600)
    try:
        run = apply(pair.primary)
        assert run.returncode == 0, run.stderr[-5000:]
        assert f"revoke replica {REPLICA_NAME}" in run.stderr
        assert raw_get(pair.replication_port, "/+api", [], pair.ca, cert=issued)[0] == 403
        assert not pair.primary.path(ISSUED_CERT).exists()
    finally:
        pair.primary.write(CONFIG, config, mode=0o600)
        run = apply(pair.primary)
        assert run.returncode == 0, run.stderr[-5000:]
    # A new certificate was issued for the name; the replica gets it and syncs again.
    pair.replica.copy_in(pair.primary.path(ISSUED_CERT), REPLICA_CERT_FILE, mode=0o600)
    run = apply(pair.replica)
    assert run.returncode == 0, run.stderr[-5000:]
    assert raw_get(pair.replication_port, "/+api", [], pair.ca, cert=issued)[0] == 403


def raw_http(port: int, path: str, headers: Sequence[tuple[str, str]]) -> tuple[int, str]:
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    with socket.create_connection(("127.0.0.1", port), 30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = sock.makefile("rb").read()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode("utf-8", "replace")


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
