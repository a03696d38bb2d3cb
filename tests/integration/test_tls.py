"""TLS that fits where the server lives (issue #8), on real hosts with real peers:

- acme: Pebble (Let's Encrypt's ACME test server) on loopback is the company's ACME CA
  (`acme_ca`, `acme_ca_root`); the served certificate chains to Pebble's issuing root, pip installs
  with that root trusted, and headless Chromium loads the devpi-web page cleanly;
- the preflight: a domain pointing elsewhere and a port held by another program stop the run,
  named, while the old configuration keeps serving;
- files: a company CA made with openssl; a mismatched key and an expired certificate are refused
  with the old certificate still served; a renewed one is served after the next apply;
- internal: `devpi-agent ca` prints the root Caddy's local CA made.

The test domain resolves to 127.0.0.1 inside the test hosts (their /etc/hosts). Outside, the
clients see it through their own /etc/hosts in a private mount namespace (pip), Chromium's
--host-resolver-rules, or by connecting to 127.0.0.1 with the name as SNI (served_certificate).
"""

from __future__ import annotations

import http.server
import json
import re
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agenthost import AGENT, CADDY_CA, CONFIG, DIST, ApplyRun, Ports, apply
from clients import SYSTEM_BUNDLE, Site, http_get
from nspawn import ETC_HOSTS, NspawnHost, free_port
from tlstools import (
    Pebble,
    Pki,
    artifact_dir,
    browser_problems,
    make_browser,
    make_pki,
    pip_install_resolving,
    start_pebble,
)

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # verify (#4) uses the agent's own served_certificate()
from agent.host.tls import CertInfo, served_certificate  # noqa: E402

DOMAIN = "pypi.devpi-agent.test"
ELSEWHERE = "elsewhere.devpi-agent.test"
ELSEWHERE_ADDRESS = "198.51.100.77"  # TEST-NET-2: never this machine
# Not the canary of test_apply.py: Chromium takes this one in its argv.
PASSWORD = "tls-test-Pw-51b7e0c3"
PEBBLE_LISTENER_CA = "/etc/devpi-agent/pebble-listener-ca.pem"
COMPANY_CERT = "/etc/ssl/devpi/pypi.pem"
COMPANY_KEY = "/etc/ssl/private/pypi.key"


def config_text(ports: Ports, domain: str, http_port: int, tls: str) -> str:
    return f"""
[server]
domain = "{domain}"
https_port = {ports.https}
http_port = {http_port}
{tls}

[devpi]
port = {ports.devpi}

[[users]]
name = "devops"
password = "{PASSWORD}"

[[indexes]]
name = "devops/pypi"
bases = ["root/pypi"]
"""


def steps(run: ApplyRun) -> dict[str, str]:
    return {s["name"]: s["status"] for s in run.report["steps"]}  # type: ignore[union-attr]


def step_errors(run: ApplyRun) -> str:
    """The `step failed` errors of a run's JSON log lines on stderr."""
    errors = []
    for line in run.stderr.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "step failed":
            errors.append(f"{event.get('step')}: {event.get('error')}")
    return "\n".join(errors)


def wait_for_certificate(
    port: int, server_name: str, cafile: Path, issuer: str, timeout: float = 90
) -> CertInfo:
    """Caddy gets an ACME certificate after `apply` returns: poll until it serves it."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            info = served_certificate("127.0.0.1", port, server_name, cafile=cafile, timeout=5)
            if issuer in info.issuer:
                return info
            last = info
        except OSError as error:
            last = error
        time.sleep(0.5)
    raise AssertionError(f"no certificate from {issuer!r} after {timeout} s: {last}")


# --- acme against Pebble ----------------------------------------------------------------------


@dataclass
class AcmeHost:
    host: NspawnHost
    ports: Ports
    http_port: int
    pebble: Pebble
    pebble_root: Path
    first: ApplyRun
    second: ApplyRun
    certificate: CertInfo
    workdir: Path

    def site(self, ca_bundle: Path) -> Site:
        return Site(DOMAIN, self.ports.https, "devops/pypi", "devops", PASSWORD, ca_bundle)


@pytest.fixture(scope="module")
def acme(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AcmeHost]:
    assert DIST.exists(), f"{DIST} is missing: run `make dist` first"
    workdir = tmp_path_factory.mktemp("acme")
    pebble = start_pebble(workdir)
    ports, http_port = Ports.free(), free_port()
    host = NspawnHost(rootfs)
    try:
        host.prepare()
        host.copy_in(DIST, AGENT, mode=0o755)
        host.write(
            "/etc/hosts",
            ETC_HOSTS + f"127.0.0.1\t{DOMAIN}\n{ELSEWHERE_ADDRESS}\t{ELSEWHERE}\n",
        )
        host.copy_in(pebble.listener_ca, PEBBLE_LISTENER_CA, mode=0o600)
        tls = f'acme_ca = "{pebble.directory_url}"\nacme_ca_root = "{PEBBLE_LISTENER_CA}"'
        host.write(CONFIG, config_text(ports, DOMAIN, http_port, tls), mode=0o600)
        host.start(systemd=True)
        first = apply(host)
        assert first.returncode == 0, first.stderr[-5000:]
        pebble_root = workdir / "pebble-root.pem"
        pebble_root.write_bytes(pebble.issuing_root())
        certificate = wait_for_certificate(ports.https, DOMAIN, pebble_root, "Pebble")
        second = apply(host)
        yield AcmeHost(
            host, ports, http_port, pebble, pebble_root, first, second, certificate, workdir
        )
    except BaseException:
        print(host.debug_report())
        print(pebble.log()[-5000:])
        raise
    finally:
        host.stop()
        pebble.stop()


def test_acme_apply_runs_the_tls_step_before_caddy(acme: AcmeHost) -> None:
    assert acme.first.report["failed"] == 0
    names = list(steps(acme.first))
    # Right after apt: a problem stops the run before devpi or Caddy are touched.
    assert names.index("tls") == names.index("apt") + 1
    assert acme.second.returncode == 0 and acme.second.report["changed"] == 0, acme.second.report
    print(f"acme first apply {acme.first.seconds:.1f} s, no-op {acme.second.seconds:.1f} s")


def test_caddyfile_points_at_pebble(acme: AcmeHost) -> None:
    caddyfile = acme.host.path("/etc/caddy/Caddyfile").read_text()
    assert f"\tacme_ca {acme.pebble.directory_url}\n" in caddyfile
    assert "\tacme_ca_root /etc/caddy/tls/acme-ca-root.pem\n" in caddyfile
    # Caddy reads the CA root as the caddy user: the agent gave it its own copy.
    mode = acme.host.output(["stat", "-c", "%a %U:%G", "/etc/caddy/tls/acme-ca-root.pem"])
    assert mode == "644 root:caddy"


def test_served_certificate_chains_to_pebbles_root(acme: AcmeHost) -> None:
    info = acme.certificate
    assert info.chain_ok, info.verify_error
    assert info.issuer.startswith("CN=Pebble Intermediate CA")
    assert info.names == (DOMAIN,)
    assert info.days_left > 300
    untrusted = served_certificate("127.0.0.1", acme.ports.https, DOMAIN, cafile=SYSTEM_BUNDLE)
    assert not untrusted.chain_ok  # Pebble's root is in no public store
    print(f"served: {info}")


def test_pip_installs_with_pebbles_root_trusted(acme: AcmeHost) -> None:
    bundle = acme.workdir / "bundle.pem"
    bundle.write_bytes(SYSTEM_BUNDLE.read_bytes() + b"\n" + acme.pebble_root.read_bytes())
    hosts = acme.workdir / "client-hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {DOMAIN}\n")
    site = acme.site(bundle)
    pip = pip_install_resolving(site, hosts, acme.workdir / "home", acme.workdir / "target", "six")
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert (acme.workdir / "target" / "six.py").exists()
    # The same client without Pebble's root refuses the server.
    plain = pip_install_resolving(
        acme.site(SYSTEM_BUNDLE), hosts, acme.workdir / "home2", acme.workdir / "t2", "six"
    )
    assert plain.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in plain.stdout + plain.stderr


def test_chromium_loads_the_index_page_cleanly(acme: AcmeHost) -> None:
    home = acme.workdir / "chromium"
    browser = make_browser(home, {"pebble-root": acme.pebble_root}, {DOMAIN: "127.0.0.1"})
    url = f"https://devops:{PASSWORD}@{DOMAIN}:{acme.ports.https}/devops/pypi"
    page = browser.run(url, "--dump-dom")
    assert page.returncode == 0, page.stderr[-3000:]
    assert browser_problems(page.stderr) == [], page.stderr[-3000:]
    assert "devops/pypi" in page.stdout
    assert f"https://{DOMAIN}:{acme.ports.https}/" in page.stdout
    assert "http://" + DOMAIN not in page.stdout
    shot = artifact_dir("tls") / "devpi-web-acme.png"
    shot.unlink(missing_ok=True)
    taken = browser.run(url, f"--screenshot={shot}", "--window-size=1280,900")
    assert taken.returncode == 0, taken.stderr[-3000:]
    assert browser_problems(taken.stderr) == [], taken.stderr[-3000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot} ({shot.stat().st_size} bytes)")


def test_chromium_without_the_root_sees_a_certificate_error(acme: AcmeHost) -> None:
    browser = make_browser(acme.workdir / "chromium-untrusting", {}, {DOMAIN: "127.0.0.1"})
    url = f"https://devops:{PASSWORD}@{DOMAIN}:{acme.ports.https}/devops/pypi"
    page = browser.run(url, "--dump-dom")
    assert any("ERR_CERT" in line for line in browser_problems(page.stderr)), page.stderr[-3000:]


class _MixedContentPage(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        # Not http://127.0.0.1: loopback addresses count as secure origins, never as mixed.
        script = b"<script src='http://mixed.devpi-agent.test:9/x.js'></script>"
        body = b"<html><body><p>mixed</p>" + script + b"</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_the_browser_check_catches_mixed_content(tmp_path: Path) -> None:
    """The check above can fail: a page that pulls a script over http:// is caught."""
    pki = make_pki(tmp_path / "pki", "mixed content test CA")
    name = "mixed.devpi-agent.test"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.issue(name, f"DNS:{name}", key="mixed"), pki.key("mixed"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MixedContentPage)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        browser = make_browser(tmp_path / "chromium", {"test-ca": pki.ca}, {name: "127.0.0.1"})
        page = browser.run(f"https://{name}:{server.server_address[1]}/", "--dump-dom")
    finally:
        server.shutdown()
        server.server_close()
    assert "<p>mixed</p>" in page.stdout, page.stderr[-3000:]
    problems = browser_problems(page.stderr)
    assert any("Mixed Content" in line for line in problems), page.stderr[-3000:]
    assert not any("ERR_CERT" in line for line in problems)


def test_preflight_stops_a_domain_pointing_elsewhere_and_a_taken_port(acme: AcmeHost) -> None:
    host = acme.host
    squatted = free_port()
    squatter = ["python3", "-m", "http.server", str(squatted), "--bind", "127.0.0.1"]
    host.run(["systemd-run", "--unit=squatter", *squatter])
    try:
        tls = f'acme_ca = "{acme.pebble.directory_url}"'
        elsewhere = config_text(acme.ports, ELSEWHERE, squatted, tls)
        host.write("/etc/devpi-agent/elsewhere.toml", elsewhere, mode=0o600)
        _wait_listening(host, squatted)
        run = apply(host, config="/etc/devpi-agent/elsewhere.toml")
    finally:
        host.run(["systemctl", "stop", "squatter"], check=False)
    assert run.returncode == 1, run.stderr[-3000:]
    assert list(steps(run)) == ["apt", "tls"] and steps(run)["tls"] == "failed"
    errors = step_errors(run)
    assert f"server.domain {ELSEWHERE} resolves to {ELSEWHERE_ADDRESS}, not to this host" in errors
    assert re.search(r"its addresses: [^)]*127\.0\.0\.0/8", errors), errors
    assert f"port {squatted} (server.http_port) is already held by python3 (pid " in errors
    print(errors)
    # Caddy was never told: it still serves the old name with its certificate.
    still = served_certificate("127.0.0.1", acme.ports.https, DOMAIN, cafile=acme.pebble_root)
    assert still.chain_ok and still.sha256 == acme.certificate.sha256
    assert DOMAIN in host.path("/etc/caddy/Caddyfile").read_text()


def _wait_listening(host: NspawnHost, port: int) -> None:
    deadline = time.monotonic() + 30
    while f":{port:04X} " not in host.output(["cat", "/proc/net/tcp"]).upper():
        assert time.monotonic() < deadline, f"nothing listens on {port}"
        time.sleep(0.2)


# --- internal, then the company's certificate files -------------------------------------------


@dataclass
class FilesHost:
    host: NspawnHost
    ports: Ports
    pki: Pki
    workdir: Path
    serving: CertInfo | None = None

    def write_config(self, tls: str) -> None:
        write_files_config(self.host, self.ports, tls)

    def install(self, cert: Path, key: Path) -> None:
        self.host.copy_in(cert, COMPANY_CERT, mode=0o644)
        self.host.copy_in(key, COMPANY_KEY, mode=0o600)

    def served(self) -> CertInfo:
        return served_certificate("127.0.0.1", self.ports.https, "127.0.0.1", cafile=self.pki.ca)


def write_files_config(host: NspawnHost, ports: Ports, tls: str) -> None:
    host.write(CONFIG, config_text(ports, "127.0.0.1", 0, tls), mode=0o600)


FILES_TLS = f'tls = "files"\ncert_file = "{COMPANY_CERT}"\nkey_file = "{COMPANY_KEY}"'


@pytest.fixture(scope="module")
def files(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FilesHost]:
    assert DIST.exists(), f"{DIST} is missing: run `make dist` first"
    workdir = tmp_path_factory.mktemp("files")
    pki = make_pki(workdir / "company", "devpi-agent test company CA")
    host = NspawnHost(rootfs)
    try:
        host.prepare()
        host.copy_in(DIST, AGENT, mode=0o755)
        ports = Ports.free()
        write_files_config(host, ports, 'tls = "internal"')
        host.start(systemd=True)
        internal = apply(host)
        assert internal.returncode == 0, internal.stderr[-5000:]
        print(f"internal first apply {internal.seconds:.1f} s")
        yield FilesHost(host, ports, pki, workdir)
    except BaseException:
        print(host.debug_report())
        raise
    finally:
        host.stop()


def test_ca_prints_caddys_local_root(files: FilesHost) -> None:
    printed = files.host.run([AGENT, "ca", "--config", CONFIG], check=False)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == files.host.path(CADDY_CA).read_bytes()
    root = files.workdir / "internal-root.pem"
    root.write_bytes(printed.stdout)
    info = served_certificate("127.0.0.1", files.ports.https, "127.0.0.1", cafile=root)
    assert info.chain_ok, info.verify_error
    assert "Caddy Local Authority" in info.issuer


def test_switch_to_the_companys_certificate(files: FilesHost) -> None:
    cert = files.pki.issue("pypi-1", f"IP:127.0.0.1,DNS:{DOMAIN}", key="pypi")
    files.install(cert, files.pki.key("pypi"))
    files.write_config(FILES_TLS)
    run = apply(files.host)
    assert run.returncode == 0, run.stderr[-5000:]
    assert steps(run)["tls"] == "changed" and steps(run)["caddy"] == "changed"
    info = files.served()
    assert info.chain_ok, info.verify_error
    assert info.issuer == "CN=devpi-agent test company CA" and info.subject == "CN=pypi-1"
    files.serving = info
    host = files.host
    assert host.output(["stat", "-c", "%a %U:%G", "/etc/caddy/tls/key.pem"]) == "640 root:caddy"
    assert host.output(["stat", "-c", "%a %U:%G", "/etc/caddy/tls"]) == "750 root:caddy"
    bundle = files.workdir / "bundle.pem"
    bundle.write_bytes(files.pki.ca.read_bytes())
    site = Site("127.0.0.1", files.ports.https, "devops/pypi", "devops", PASSWORD, bundle)
    assert http_get(site, "/+api", auth=("devops", PASSWORD))[0] == 200
    # Only tls = "internal" has a local CA to print.
    ca = host.run([AGENT, "ca", "--config", CONFIG], check=False)
    assert ca.returncode == 1 and b'only with tls = "internal"' in ca.stderr
    again = apply(host)
    assert again.returncode == 0 and again.report["changed"] == 0, again.report


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("mismatched-key", "is not the key of the certificate in server.cert_file"),
        ("expired", "expired on"),
    ],
)
def test_bad_files_are_refused_and_the_old_certificate_keeps_serving(
    files: FilesHost, case: str, says: str
) -> None:
    assert files.serving is not None, "test_switch_to_the_companys_certificate did not pass"
    if case == "mismatched-key":
        cert = files.pki.dir / "pypi-1.pem"
        key = files.pki.key("other")
    else:
        cert = files.pki.issue("pypi-expired", "IP:127.0.0.1", key="pypi", days=-1)
        key = files.pki.key("pypi")
    files.install(cert, key)
    run = apply(files.host)
    assert run.returncode == 1, run.stderr[-3000:]
    assert steps(run)["tls"] == "failed" and "caddy" not in steps(run)
    errors = step_errors(run)
    assert says in errors, errors
    print(errors)
    assert files.served().sha256 == files.serving.sha256


def test_renewed_certificate_is_served_after_apply(files: FilesHost) -> None:
    assert files.serving is not None, "test_switch_to_the_companys_certificate did not pass"
    renewed = files.pki.issue("pypi-2", "IP:127.0.0.1", key="pypi-2")
    files.install(renewed, files.pki.key("pypi-2"))
    run = apply(files.host)
    assert run.returncode == 0, run.stderr[-5000:]
    assert steps(run)["tls"] == "changed"
    info = files.served()
    assert info.subject == "CN=pypi-2" and info.chain_ok
    assert info.sha256 != files.serving.sha256
    again = apply(files.host)
    assert again.returncode == 0 and again.report["changed"] == 0, again.report
