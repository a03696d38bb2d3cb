"""TLS (issue #8): the X.509 reader, the facts and checks in agent/host/tls.py, the tls step, and
`devpi-agent ca`. Certificates are real ones made with the openssl CLI; host facts (addresses,
listeners, the EC2 metadata service) are made up, or served from loopback.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import FakeRunner, assert_golden, make_ctx, reference_data
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.commands.cli import main
from agent.core import paths
from agent.core.config import Config, parse
from agent.core.context import StepFailed
from agent.host import caddy as host_caddy
from agent.host import tls, x509
from agent.steps import caddy
from agent.steps import tls as tls_step

# --- a small PKI, made with openssl -----------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path
    # CN=pypi.example.com, SANs pypi.example.com, *.pypi.example.com, 192.0.2.10, 2001:db8::10
    leaf: Path
    leaf_key: Path
    other_key: Path
    expired: Path  # same key as leaf
    cn_only: Path


def openssl(*args: str, cwd: Path) -> str:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _sign(pki: Path, name: str, key: str, days: str, extensions: str) -> Path:
    openssl("req", "-new", "-key", key, "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=pki)
    (pki / f"{name}.ext").write_text(extensions)
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", days, "-extfile", f"{name}.ext", "-out", f"{name}.pem",
        cwd=pki,
    )  # fmt: skip
    return pki / f"{name}.pem"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "30",
        "-subj", "/O=Example Corp/CN=Example Corp Test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip
    for key in ("leaf.key", "other.key"):
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-out", key, cwd=d)  # fmt: skip
        os.chmod(d / key, 0o600)
    sans = (
        "subjectAltName=DNS:pypi.example.com,DNS:*.pypi.example.com,IP:192.0.2.10,IP:2001:db8::10\n"
    )
    leaf = _sign(d, "pypi.example.com", "leaf.key", "10", sans + "extendedKeyUsage=serverAuth\n")
    expired = _sign(d, "expired", "leaf.key", "-1", sans)
    cn_only = _sign(d, "cn-only.example.com", "leaf.key", "10", "basicConstraints=CA:FALSE\n")
    return Pki(d, d / "ca.pem", leaf, d / "leaf.key", d / "other.key", expired, cn_only)


def openssl_field(cert: Path, option: str) -> str:
    return openssl("x509", "-in", str(cert), "-noout", option, cwd=cert.parent).strip()


# --- x509 -------------------------------------------------------------------------------------


def test_reads_what_openssl_reads(pki: Pki) -> None:
    [leaf] = x509.load_pem(pki.leaf.read_bytes())
    assert leaf.subject == "CN=pypi.example.com"
    assert leaf.issuer == "O=Example Corp, CN=Example Corp Test CA"
    assert leaf.common_name == "pypi.example.com"
    assert leaf.dns_names == ("pypi.example.com", "*.pypi.example.com")
    assert leaf.ip_addresses == (
        ipaddress.ip_address("192.0.2.10"),
        ipaddress.ip_address("2001:db8::10"),
    )
    assert leaf.serial == int(openssl_field(pki.leaf, "-serial").split("=")[1], 16)
    not_after = openssl_field(pki.leaf, "-enddate").split("=")[1]
    assert leaf.not_after == datetime.strptime(not_after, "%b %d %H:%M:%S %Y %Z").replace(
        tzinfo=timezone.utc
    )
    assert leaf.not_after - leaf.not_before == timedelta(days=10)
    assert not leaf.is_ca
    [ca] = x509.load_pem(pki.ca.read_bytes())
    assert ca.is_ca and ca.subject == ca.issuer


def test_reads_every_certificate_of_the_system_store() -> None:
    bundle = Path("/etc/ssl/certs/ca-certificates.crt").read_bytes()
    certificates = x509.load_pem(bundle)
    assert len(certificates) == bundle.count(b"-----BEGIN CERTIFICATE-----") > 50
    assert all(c.is_ca and c.issuer for c in certificates)


@pytest.mark.parametrize(
    ("name", "covered"),
    [
        ("pypi.example.com", True),
        ("PYPI.Example.com.", True),
        ("a.pypi.example.com", True),  # *.pypi.example.com
        ("a.b.pypi.example.com", False),  # a wildcard is one label
        ("example.com", False),
        ("pypi.example.org", False),
        ("192.0.2.10", True),
        ("192.0.2.11", False),
        ("2001:db8::10", True),
        ("2001:db8:0:0::10", True),
        ("[2001:db8::10]", True),
        ("pypi.example.com.evil", False),
    ],
)
def test_name_coverage(pki: Pki, name: str, covered: bool) -> None:
    [leaf] = x509.load_pem(pki.leaf.read_bytes())
    assert leaf.covers(name) is covered


def test_common_name_alone_covers_nothing(pki: Pki) -> None:
    # Browsers and Go (Caddy's clients) have ignored the CN for years: so do we.
    [cert] = x509.load_pem(pki.cn_only.read_bytes())
    assert cert.common_name == "cn-only.example.com"
    assert not cert.covers("cn-only.example.com")


def test_chain_keeps_file_order(pki: Pki) -> None:
    chain = x509.load_pem(pki.leaf.read_bytes() + b"\n" + pki.ca.read_bytes())
    assert [c.is_ca for c in chain] == [False, True]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a certificate",
        b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n",
    ],
)
def test_not_a_certificate(data: bytes) -> None:
    with pytest.raises(x509.CertificateError):
        x509.load_pem(data)


def test_truncated_der_is_a_certificate_error(pki: Pki) -> None:
    der = x509.pem_blocks(pki.leaf.read_bytes())[0]
    for cut in (1, 2, 10, len(der) // 2, len(der) - 1):
        with pytest.raises(x509.CertificateError):
            x509.parse_der(der[:cut])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_junk_der_raises_only_certificate_error(data: bytes) -> None:
    with contextlib.suppress(x509.CertificateError):
        x509.parse_der(data)


def test_two_digit_years_follow_rfc_5280() -> None:
    assert x509._time(0x17, b"491231235959Z").year == 2049
    assert x509._time(0x17, b"500101000000Z").year == 1950
    assert x509._time(0x18, b"20500101000000Z").year == 2050


# --- certificate files ------------------------------------------------------------------------


def test_good_pair(pki: Pki) -> None:
    pair = tls.check_certificate_pair(pki.leaf, pki.leaf_key, "pypi.example.com")
    assert pair.leaf.subject == "CN=pypi.example.com"
    assert pair.cert_pem == pki.leaf.read_bytes()
    assert pair.key_pem == pki.leaf_key.read_bytes()
    assert "key_pem" not in repr(pair)


def test_wildcard_and_ip_domains_are_covered(pki: Pki) -> None:
    for domain in ("devpi.pypi.example.com", "192.0.2.10", "2001:db8::10"):
        tls.check_certificate_pair(pki.leaf, pki.leaf_key, domain)


def test_mismatched_key(pki: Pki) -> None:
    with pytest.raises(tls.TlsProblem) as raised:
        tls.check_certificate_pair(pki.leaf, pki.other_key, "pypi.example.com")
    assert f"server.key_file {pki.other_key} is not the key of the certificate" in str(raised.value)
    assert "CN=pypi.example.com" in str(raised.value)


def test_expired_certificate(pki: Pki) -> None:
    with pytest.raises(tls.TlsProblem, match=r"expired on \d{4}-\d\d-\d\d \d\d:\d\d UTC"):
        tls.check_certificate_pair(pki.expired, pki.leaf_key, "pypi.example.com")


def test_certificate_from_the_future(pki: Pki) -> None:
    earlier = datetime.now(timezone.utc) - timedelta(days=2)
    with pytest.raises(tls.TlsProblem, match=r"not valid before .* \(check this host's clock\)"):
        tls.check_certificate_pair(pki.leaf, pki.leaf_key, "pypi.example.com", now=earlier)


def test_name_not_covered(pki: Pki) -> None:
    with pytest.raises(tls.TlsProblem) as raised:
        tls.check_certificate_pair(pki.leaf, pki.leaf_key, "pypi.example.org")
    message = str(raised.value)
    assert "does not cover server.domain pypi.example.org" in message
    assert "pypi.example.com, *.pypi.example.com, 192.0.2.10, 2001:db8::10" in message


def test_world_readable_key(pki: Pki, tmp_path: Path) -> None:
    key = tmp_path / "open.key"
    key.write_bytes(pki.leaf_key.read_bytes())
    key.chmod(0o644)
    with pytest.raises(tls.TlsProblem, match=r"open to every user \(mode 0644\): chmod 600"):
        tls.check_certificate_pair(pki.leaf, key, "pypi.example.com")
    key.chmod(0o640)  # group-readable (ssl-cert) is fine
    tls.check_certificate_pair(pki.leaf, key, "pypi.example.com")


def test_encrypted_key(pki: Pki, tmp_path: Path) -> None:
    key = tmp_path / "encrypted.key"
    openssl("pkey", "-in", str(pki.leaf_key), "-aes256", "-passout", "pass:secret-x",
            "-out", str(key), cwd=tmp_path)  # fmt: skip
    key.chmod(0o600)
    with pytest.raises(tls.TlsProblem, match="must be an unencrypted PEM private key"):
        tls.check_certificate_pair(pki.leaf, key, "pypi.example.com")


def test_missing_and_wrong_files(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(tls.TlsProblem, match=f"server.cert_file {tmp_path}/nope.pem does not"):
        tls.check_certificate_pair(tmp_path / "nope.pem", pki.leaf_key, "pypi.example.com")
    with pytest.raises(tls.TlsProblem, match=r"server.key_file .* does not exist"):
        tls.check_certificate_pair(pki.leaf, tmp_path / "nope.key", "pypi.example.com")
    with pytest.raises(tls.TlsProblem, match=r"server.cert_file .*: no PEM certificate"):
        tls.check_certificate_pair(pki.leaf_key, pki.leaf_key, "pypi.example.com")


# --- what a server serves ---------------------------------------------------------------------


@pytest.fixture
def tls_server(pki: Pki) -> Iterator[int]:
    """A TLS server on loopback serving the leaf certificate, for as long as the test runs."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.leaf, pki.leaf_key)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(connection, server_side=True) as tls_connection:
                    tls_connection.recv(1)
            except (OSError, ssl.SSLError):
                connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()
    thread.join(timeout=5)


def test_served_certificate_trusted(pki: Pki, tls_server: int) -> None:
    info = tls.served_certificate("127.0.0.1", tls_server, "pypi.example.com", cafile=pki.ca)
    assert info.chain_ok and info.verify_error is None
    assert info.issuer == "O=Example Corp, CN=Example Corp Test CA"
    assert info.subject == "CN=pypi.example.com"
    assert 9 <= info.days_left <= 10
    assert info.serial == x509.load_pem(pki.leaf.read_bytes())[0].serial
    assert '"chain_ok": true' in str(info)


def test_served_certificate_untrusted_or_wrong_name(pki: Pki, tls_server: int) -> None:
    untrusted = tls.served_certificate("127.0.0.1", tls_server, "pypi.example.com")
    assert not untrusted.chain_ok
    assert untrusted.verify_error and "issuer certificate" in untrusted.verify_error
    assert untrusted.issuer == "O=Example Corp, CN=Example Corp Test CA"
    wrong = tls.served_certificate("127.0.0.1", tls_server, "other.example.org", cafile=pki.ca)
    assert not wrong.chain_ok
    assert wrong.verify_error and "mismatch" in wrong.verify_error.lower()
    by_ip = tls.served_certificate("127.0.0.1", tls_server, "192.0.2.10", cafile=pki.ca)
    assert by_ip.chain_ok  # an IP SAN, checked without SNI


def test_served_certificate_connection_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as unused:
        port = unused.getsockname()[1]
    with pytest.raises(OSError):
        tls.served_certificate("127.0.0.1", port, "pypi.example.com", timeout=2)


# --- where the domain points ------------------------------------------------------------------

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 10.0.0.0/24 2 0 2
           |-- 10.0.0.0
              /24 link UNICAST
           |-- 10.0.0.5
              /32 host LOCAL
        |-- 10.0.0.255
           /32 link BROADCAST
Local:
  +-- 0.0.0.0/0 3 0 5
           |-- 10.0.0.5
              /32 host LOCAL
"""
IF_INET6 = """\
00000000000000000000000000000001 01 80 10 80       lo
20010db8000000000000000000000005 02 40 00 00     eth0
fe800000000000000000000000000005 02 40 20 80     eth0
"""


def networks(*texts: str) -> tuple[tls.Network, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


def test_parse_fib_trie() -> None:
    assert tls.parse_fib_trie(FIB_TRIE) == list(
        networks("127.0.0.0/8", "127.0.0.1/32", "10.0.0.5/32")
    )


def test_parse_if_inet6() -> None:
    assert tls.parse_if_inet6(IF_INET6) == list(
        networks("::1/128", "2001:db8::5/128", "fe80::5/128")
    )


def test_interface_networks_of_this_machine() -> None:
    found = tls.interface_networks()
    assert any(ipaddress.ip_address("127.0.0.1") in n for n in found)


def address(text: str) -> tls.Address:
    return ipaddress.ip_address(text)


# 93.184.215.14 stands for a public address of this host (documentation ranges are not global).
HOST = tls.HostAddresses(
    networks("127.0.0.0/8", "10.0.0.5/32", "93.184.215.14/32", "2001:db8::5/128")
)


def test_host_addresses_include_loopback_range_and_public() -> None:
    assert HOST.includes(address("127.0.1.1"))
    assert HOST.includes(address("2001:db8::5"))
    assert not HOST.includes(address("10.0.0.6"))
    ec2 = tls.HostAddresses(HOST.local, (address("54.93.1.7"),), "EC2 public IPv4")
    assert ec2.includes(address("54.93.1.7"))
    assert ec2.describe() == (
        "10.0.0.5, 93.184.215.14, 127.0.0.0/8, 2001:db8::5; EC2 public IPv4 54.93.1.7"
    )


def test_domain_pointing_here_passes() -> None:
    resolved = (address("93.184.215.14"), address("2001:db8::99"))
    assert tls.domain_problem("pypi.example.com", resolved, HOST) is None


def test_public_ca_needs_a_public_address_of_this_host() -> None:
    # Debian's /etc/hosts maps the host's own name to 127.0.1.1: that is no proof of public DNS.
    for private in ("127.0.1.1", "10.0.0.5"):
        problem = tls.domain_problem("pypi.example.com", (address(private),), HOST)
        assert problem is not None
        assert f"resolves to {private}: this host, but no public address" in problem
        assert "an /etc/hosts entry does not count" in problem
        # A company CA on the same network reaches private addresses.
        company = tls.domain_problem("pypi.example.com", (address(private),), HOST, public_ca=False)
        assert company is None


def test_domain_pointing_elsewhere_names_domain_and_addresses() -> None:
    resolved = (address("198.51.100.7"), address("2001:db8::99"))
    problem = tls.domain_problem("pypi.example.com", resolved, HOST)
    assert problem is not None
    assert "server.domain pypi.example.com resolves to 198.51.100.7, 2001:db8::99" in problem
    assert (
        "not to this host (its addresses: 10.0.0.5, 93.184.215.14, 127.0.0.0/8, 2001:db8::5)"
        in problem
    )
    assert "server.acme_preflight = false" in problem


def test_domain_that_does_not_resolve() -> None:
    problem = tls.domain_problem("pypi.example.com", tls.ResolveFailed("Name unknown"), HOST)
    assert problem is not None
    assert "server.domain pypi.example.com does not resolve (Name unknown)" in problem
    assert "10.0.0.5" in problem


def test_ec2_public_address_counts() -> None:
    ec2 = tls.HostAddresses(HOST.local, (address("54.93.1.7"),), "EC2 public IPv4")
    assert tls.domain_problem("pypi.example.com", (address("54.93.1.7"),), ec2) is None


def test_resolve_with_the_real_resolver() -> None:
    assert address("127.0.0.1") in tls.resolve("localhost")
    with pytest.raises(tls.ResolveFailed):
        tls.resolve("no-such-name.invalid")


@pytest.mark.parametrize(
    ("http_port", "https_port", "ok"),
    [(80, 443, True), (80, 8443, True), (0, 443, True), (8080, 8443, False), (0, 8443, False)],
)
def test_public_ca_ports(http_port: int, https_port: int, ok: bool) -> None:
    assert (tls.public_ports_problem(http_port, https_port) is None) is ok


# --- EC2 --------------------------------------------------------------------------------------


def test_on_ec2(tmp_path: Path) -> None:
    assert not tls.on_ec2(tmp_path)
    dmi = tmp_path / "class/dmi/id"
    dmi.mkdir(parents=True)
    (dmi / "sys_vendor").write_text("QEMU\n")
    assert not tls.on_ec2(tmp_path)
    (dmi / "sys_vendor").write_text("Amazon EC2\n")
    assert tls.on_ec2(tmp_path)
    xen = tmp_path / "xen"
    (xen / "hypervisor").mkdir(parents=True)
    (xen / "hypervisor/uuid").write_text("ec2e1916-9099-7caf-fd21-012345abcdef\n")
    assert tls.on_ec2(xen)


class FakeImds(http.server.BaseHTTPRequestHandler):
    """IMDSv2: a PUT for a token, then GETs that must carry it."""

    public_ipv4: str | None = "203.0.113.7"

    def do_PUT(self) -> None:
        ok = (
            self.path == "/latest/api/token"
            and self.headers["X-aws-ec2-metadata-token-ttl-seconds"]
        )
        self._answer(200 if ok else 400, "token-123")

    def do_GET(self) -> None:
        if self.headers["X-aws-ec2-metadata-token"] != "token-123":
            self._answer(401, "")
        elif self.path == "/latest/meta-data/public-ipv4" and self.public_ipv4:
            self._answer(200, self.public_ipv4)
        else:
            self._answer(404, "")

    def _answer(self, status: int, body: str) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def imds() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeImds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    FakeImds.public_ipv4 = "203.0.113.7"


def test_ec2_public_ipv4_through_imdsv2(imds: str) -> None:
    assert tls.ec2_public_ipv4(imds) == address("203.0.113.7")
    FakeImds.public_ipv4 = None  # a private subnet: 404
    assert tls.ec2_public_ipv4(imds) is None


def test_ec2_metadata_silence_is_short() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        started = datetime.now(timezone.utc)
        port = silent.getsockname()[1]
        assert tls.ec2_public_ipv4(f"http://127.0.0.1:{port}", timeout=0.3) is None
        assert datetime.now(timezone.utc) - started < timedelta(seconds=2)


def test_host_addresses_on_ec2(tmp_path: Path, imds: str) -> None:
    proc, sys_root = tmp_path / "proc", tmp_path / "sys"
    (proc / "net").mkdir(parents=True)
    (proc / "net/fib_trie").write_text(FIB_TRIE)
    (sys_root / "class/dmi/id").mkdir(parents=True)
    (sys_root / "class/dmi/id/sys_vendor").write_text("Amazon EC2\n")
    found = tls.host_addresses(proc, sys_root, imds)
    assert found.public == (address("203.0.113.7"),)
    assert found.local == networks("127.0.0.0/8", "127.0.0.1/32", "10.0.0.5/32")
    (sys_root / "class/dmi/id/sys_vendor").write_text("Dell Inc.\n")
    assert tls.host_addresses(proc, sys_root, "http://192.0.2.1:1").public == ()


# --- what holds the ports ---------------------------------------------------------------------

PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1
   1: 0100007F:01BB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1002 1
   2: 0100007F:C350 0100007F:01BB 01 00000000:00000000 00:00000000 00000000     0        0 1003 1
"""
PROC_NET_TCP6 = (
    "  sl  local_address                         remote_address                        st"
    " tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    "   0: 00000000000000000000000000000000:01BB 00000000000000000000000000000000:0000 0A"
    " 00000000:00000000 00:00000000 00000000   998        0 2001 1\n"
)


def test_parse_proc_net_tcp() -> None:
    assert tls.parse_proc_net_tcp(PROC_NET_TCP) == [("0.0.0.0", 80, 1001), ("127.0.0.1", 443, 1002)]
    assert tls.parse_proc_net_tcp(PROC_NET_TCP6) == [("::", 443, 2001)]


def fake_proc(root: Path, holders: dict[int, tuple[str, list[int]]]) -> Path:
    """A /proc with net/tcp{,6} above and processes pid -> (comm, socket inodes)."""
    (root / "net").mkdir(parents=True)
    (root / "net/tcp").write_text(PROC_NET_TCP)
    (root / "net/tcp6").write_text(PROC_NET_TCP6)
    for pid, (comm, inodes) in holders.items():
        (root / str(pid) / "fd").mkdir(parents=True)
        (root / str(pid) / "comm").write_text(comm + "\n")
        (root / str(pid) / "fd/0").symlink_to("/dev/null")
        for n, inode in enumerate(inodes, start=3):
            (root / str(pid) / "fd" / str(n)).symlink_to(f"socket:[{inode}]")
    return root


def test_listeners_name_their_process(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {812: ("nginx", [1001]), 900: ("caddy", [1002, 2001])})
    found = tls.listeners([80, 443], proc)
    assert sorted((l.port, l.address, l.pid, l.program) for l in found) == [  # noqa: E741
        (80, "0.0.0.0", 812, "nginx"),
        (443, "127.0.0.1", 900, "caddy"),
        (443, "::", 900, "caddy"),
    ]
    assert tls.listeners([8443], proc) == []


def test_port_problems_ignore_caddy(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {812: ("nginx", [1001]), 900: ("caddy", [1002, 2001])})
    ports = {443: "server.https_port", 80: "server.http_port"}
    problems = tls.port_problems(tls.listeners(ports, proc), ports)
    assert problems == [
        "port 80 (server.http_port) is already held by nginx (pid 812): Caddy cannot listen "
        "there; stop it or choose another port"
    ]


def test_port_held_by_an_unseen_process(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {})
    problems = tls.port_problems(tls.listeners([443], proc), {443: "server.https_port"})
    assert len(problems) == 1
    assert "a process outside this host's view (socket inode" in problems[0]


def test_listeners_on_this_machine() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]
        [found] = tls.listeners([port])
    assert found.port == port and found.address == "127.0.0.1"
    assert found.pid == os.getpid()


# --- the tls step -----------------------------------------------------------------------------


def config(**server: Any) -> Config:
    data = reference_data()
    data["server"].update(server)
    return parse(data)


@pytest.fixture
def facts(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The step's view of the host, made up: nothing listening, pypi.example.com points here."""
    view: dict[str, Any] = {
        "listeners": [],
        "host": tls.HostAddresses(networks("127.0.0.0/8", "93.184.215.14/32")),
        "resolved": {"pypi.example.com": (address("93.184.215.14"),)},
        "resolve_calls": [],
    }

    def resolve(name: str) -> tuple[tls.Address, ...]:
        view["resolve_calls"].append(name)
        if name not in view["resolved"]:
            raise tls.ResolveFailed("Name or service not known")
        return view["resolved"][name]  # type: ignore[no-any-return]

    monkeypatch.setattr(tls, "listeners", lambda ports: view["listeners"])
    monkeypatch.setattr(tls, "host_addresses", lambda: view["host"])
    monkeypatch.setattr(tls, "resolve", resolve)
    return view


CADDYFILE = Path("/etc/caddy/Caddyfile")


def under(root: Path, path: Path) -> Path:
    return root / path.relative_to("/")


def test_acme_domain_here_passes(tmp_path: Path, facts: dict[str, Any]) -> None:
    ctx = make_ctx(tmp_path, config(), FakeRunner())
    tls_step.converge(ctx)
    assert ctx.changes == []
    assert facts["resolve_calls"] == ["pypi.example.com"]


def test_acme_domain_elsewhere_fails(tmp_path: Path, facts: dict[str, Any]) -> None:
    facts["resolved"]["pypi.example.com"] = (address("198.51.100.7"),)
    ctx = make_ctx(tmp_path, config(), FakeRunner())
    with pytest.raises(StepFailed) as raised:
        tls_step.converge(ctx)
    assert "server.domain pypi.example.com resolves to 198.51.100.7" in str(raised.value)
    assert "93.184.215.14, 127.0.0.0/8" in str(raised.value)


def test_company_ca_accepts_a_private_address(tmp_path: Path, facts: dict[str, Any]) -> None:
    facts["host"] = tls.HostAddresses(networks("127.0.0.0/8"))
    facts["resolved"]["pypi.example.com"] = (address("127.0.0.1"),)
    with pytest.raises(StepFailed, match="no public address"):
        tls_step.converge(make_ctx(tmp_path, config(), FakeRunner()))
    company = config(acme_ca="https://127.0.0.1:14000/dir")
    tls_step.converge(make_ctx(tmp_path, company, FakeRunner()))


def test_acme_preflight_off_skips_dns(tmp_path: Path, facts: dict[str, Any]) -> None:
    facts["resolved"].clear()
    ctx = make_ctx(tmp_path, config(acme_preflight=False, https_port=8443), FakeRunner())
    tls_step.converge(ctx)
    assert facts["resolve_calls"] == []


def test_public_ca_on_other_ports_fails(tmp_path: Path, facts: dict[str, Any]) -> None:
    ctx = make_ctx(tmp_path, config(http_port=0, https_port=8443), FakeRunner())
    with pytest.raises(StepFailed, match="validated on port 80 or 443"):
        tls_step.converge(ctx)
    company = config(http_port=0, https_port=8443, acme_ca="https://ca.example.com/dir")
    tls_step.converge(make_ctx(tmp_path, company, FakeRunner()))


def test_port_held_by_another_program_fails_every_mode(
    tmp_path: Path, facts: dict[str, Any]
) -> None:
    facts["listeners"] = [tls.Listener(443, "0.0.0.0", 1, 812, "nginx")]
    for mode in ({}, {"tls": "internal"}):
        with pytest.raises(
            StepFailed, match=r"port 443 \(server.https_port\) .* nginx \(pid 812\)"
        ):
            tls_step.converge(make_ctx(tmp_path, config(**mode), FakeRunner()))
    facts["listeners"] = [tls.Listener(443, "0.0.0.0", 1, 900, "caddy")]
    tls_step.converge(make_ctx(tmp_path, config(), FakeRunner()))


def test_all_problems_at_once(tmp_path: Path, facts: dict[str, Any]) -> None:
    facts["listeners"] = [tls.Listener(80, "0.0.0.0", 1, 812, "nginx")]
    facts["resolved"].clear()
    with pytest.raises(StepFailed) as raised:
        tls_step.converge(make_ctx(tmp_path, config(), FakeRunner()))
    lines = str(raised.value).splitlines()
    assert len(lines) == 2
    assert "port 80" in lines[0] and "does not resolve" in lines[1]


def files_config(pki: Pki, cert: Path | None = None, key: Path | None = None) -> Config:
    return config(tls="files", cert_file=str(cert or pki.leaf), key_file=str(key or pki.leaf_key))


def test_files_are_checked_and_installed(tmp_path: Path, pki: Pki, facts: dict[str, Any]) -> None:
    root = tmp_path / "root"
    ctx = make_ctx(root, files_config(pki), FakeRunner())
    tls_step.converge(ctx)
    assert ctx.changes == [
        f"make directory {tls.CADDY_TLS_DIR}",
        f"write {tls.CERT_COPY}",
        f"write {tls.KEY_COPY}",
    ]
    assert under(root, tls.CERT_COPY).read_bytes() == pki.leaf.read_bytes()
    assert under(root, tls.KEY_COPY).read_bytes() == pki.leaf_key.read_bytes()
    assert under(root, tls.KEY_COPY).stat().st_mode & 0o777 == 0o640
    assert under(root, tls.CERT_COPY).stat().st_mode & 0o777 == 0o644
    assert under(root, tls.CADDY_TLS_DIR).stat().st_mode & 0o777 == 0o750
    # No Caddyfile yet: Caddy is started later and reads the files then.
    assert not ctx.is_pending(paths.CADDY_RELOAD)
    again = make_ctx(root, files_config(pki), FakeRunner())
    tls_step.converge(again)
    assert again.changes == []
    assert [c.path for c in ctx.files.changes if "PRIVATE KEY" in c.diff] == []


def test_changed_files_reload_caddy(tmp_path: Path, pki: Pki, facts: dict[str, Any]) -> None:
    root = tmp_path / "root"
    tls_step.converge(make_ctx(root, files_config(pki), FakeRunner()))
    under(root, CADDYFILE).parent.mkdir(parents=True, exist_ok=True)
    under(root, CADDYFILE).write_text(f"tls {tls.CERT_COPY} {tls.KEY_COPY}\n")
    renewed = tmp_path / "renewed.pem"
    renewed.write_bytes(pki.leaf.read_bytes() + pki.ca.read_bytes())  # now with its chain
    ctx = make_ctx(root, files_config(pki, cert=renewed), FakeRunner())
    tls_step.converge(ctx)
    assert ctx.changes == [f"write {tls.CERT_COPY}"]
    assert ctx.is_pending(paths.CADDY_RELOAD)


def test_bad_files_leave_the_installed_ones(
    tmp_path: Path, pki: Pki, facts: dict[str, Any]
) -> None:
    root = tmp_path / "root"
    tls_step.converge(make_ctx(root, files_config(pki), FakeRunner()))
    for cert, key, message in (
        (pki.leaf, pki.other_key, "is not the key of the certificate"),
        (pki.expired, pki.leaf_key, "expired on"),
    ):
        ctx = make_ctx(root, files_config(pki, cert=cert, key=key), FakeRunner())
        with pytest.raises(StepFailed, match=message):
            tls_step.converge(ctx)
        assert ctx.changes == []
        assert under(root, tls.CERT_COPY).read_bytes() == pki.leaf.read_bytes()
        assert under(root, tls.KEY_COPY).read_bytes() == pki.leaf_key.read_bytes()


def test_copies_go_once_the_live_caddyfile_stops_using_them(
    tmp_path: Path, pki: Pki, facts: dict[str, Any]
) -> None:
    root = tmp_path / "root"
    tls_step.converge(make_ctx(root, files_config(pki), FakeRunner()))
    under(root, CADDYFILE).parent.mkdir(parents=True, exist_ok=True)
    under(root, CADDYFILE).write_text(f"tls {tls.CERT_COPY} {tls.KEY_COPY}\n")
    internal = config(tls="internal")
    ctx = make_ctx(root, internal, FakeRunner())
    tls_step.converge(ctx)
    assert ctx.changes == [] and under(root, tls.KEY_COPY).exists()
    under(root, CADDYFILE).write_text("tls internal\n")
    ctx = make_ctx(root, internal, FakeRunner())
    tls_step.converge(ctx)
    assert ctx.changes == [f"remove {tls.CERT_COPY}", f"remove {tls.KEY_COPY}"]
    assert not under(root, tls.KEY_COPY).exists()


def test_acme_ca_root_is_installed(tmp_path: Path, pki: Pki, facts: dict[str, Any]) -> None:
    root = tmp_path / "root"
    company = config(acme_ca="https://ca.example.com/dir", acme_ca_root=str(pki.ca))
    ctx = make_ctx(root, company, FakeRunner())
    tls_step.converge(ctx)
    assert under(root, tls.ACME_CA_ROOT_COPY).read_bytes() == pki.ca.read_bytes()
    missing = config(acme_ca="https://ca.example.com/dir", acme_ca_root=str(tmp_path / "no.pem"))
    with pytest.raises(StepFailed, match=r"server.acme_ca_root .*no.pem does not exist"):
        tls_step.converge(make_ctx(root, missing, FakeRunner()))
    not_pem = config(acme_ca="https://ca.example.com/dir", acme_ca_root=str(pki.leaf_key))
    with pytest.raises(StepFailed, match=r"server.acme_ca_root .*: no PEM certificate"):
        tls_step.converge(make_ctx(root, not_pem, FakeRunner()))


def test_check_mode_writes_nothing(tmp_path: Path, pki: Pki, facts: dict[str, Any]) -> None:
    root = tmp_path / "root"
    ctx = make_ctx(root, files_config(pki), FakeRunner(), check=True)
    tls_step.converge(ctx)
    assert f"write {tls.KEY_COPY}" in ctx.changes
    assert not under(root, tls.CADDY_TLS_DIR).exists()


# --- the Caddyfile ----------------------------------------------------------------------------


def test_caddyfile_files_golden(tmp_path: Path, pki: Pki) -> None:
    ctx = make_ctx(tmp_path, files_config(pki), FakeRunner())
    rendered = caddy.content(ctx, (2, 6, 2), None)
    assert f"\ttls {tls.CERT_COPY} {tls.KEY_COPY}\n" in rendered
    assert_golden("Caddyfile-2.6.2-files", _without_hashes(rendered))


def test_caddyfile_company_acme_golden(tmp_path: Path) -> None:
    company = config(
        acme_ca="https://ca.example.com:9000/acme/acme/directory", acme_ca_root="/etc/ca.pem"
    )
    rendered = caddy.content(make_ctx(tmp_path, company, FakeRunner()), (2, 6, 2), None)
    assert "\tacme_ca https://ca.example.com:9000/acme/acme/directory\n" in rendered
    assert f"\tacme_ca_root {tls.ACME_CA_ROOT_COPY}\n" in rendered  # the copy Caddy can read
    assert "tls internal" not in rendered and "\ttls /" not in rendered
    assert_golden("Caddyfile-2.6.2-acme-company-ca", _without_hashes(rendered))


def _without_hashes(text: str) -> str:
    # bcrypt salts differ on every render; the golden file is about the TLS lines.
    return "".join(
        line if "$2b$" not in line else line.split("$2b$")[0] + "<bcrypt>\n"
        for line in text.splitlines(keepends=True)
    )


# --- devpi-agent ca ---------------------------------------------------------------------------


def write_config(tmp_path: Path, **server: Any) -> Path:
    lines = ['domain = "pypi.example.com"'] + [
        f"{k} = {v!r}".replace("'", '"') for k, v in server.items()
    ]
    path = tmp_path / "config.toml"
    path.write_text(
        "[server]\n" + "\n".join(lines) + '\n[[users]]\nname = "devops"\npassword = "change-me"\n'
    )
    return path


def test_ca_prints_the_local_root(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host_caddy, "caddy_home", lambda: str(tmp_path / "caddy"))
    root = tls.internal_root(tmp_path / "caddy")
    root.parent.mkdir(parents=True)
    root.write_bytes(pki.ca.read_bytes())
    result = CliRunner().invoke(
        main, ["ca", "--config", str(write_config(tmp_path, tls="internal"))]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == pki.ca.read_text()


def test_ca_before_caddy_made_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_caddy, "caddy_home", lambda: str(tmp_path / "caddy"))
    result = CliRunner().invoke(
        main, ["ca", "--config", str(write_config(tmp_path, tls="internal"))]
    )
    assert result.exit_code == 1
    assert "Caddy's local CA does not exist yet" in result.stderr
    assert "devpi-agent apply" in result.stderr


@pytest.mark.parametrize(
    ("server", "says"),
    [
        ({}, "Let's Encrypt"),
        ({"acme_ca": "https://ca.example.com/dir"}, "https://ca.example.com/dir"),
        ({"tls": "files", "cert_file": "/etc/ssl/pypi.pem", "key_file": "/k"}, "/etc/ssl/pypi.pem"),
    ],
)
def test_ca_in_other_modes(tmp_path: Path, server: dict[str, str], says: str) -> None:
    result = CliRunner().invoke(main, ["ca", "--config", str(write_config(tmp_path, **server))])
    assert result.exit_code == 1
    assert 'only with tls = "internal"' in result.stderr
    assert says in result.stderr
    assert result.stdout == ""


def test_ca_with_an_invalid_config(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["ca", "--config", str(write_config(tmp_path, tls="self"))])
    assert result.exit_code == 2
    assert "server.tls" in result.stderr


# --- check and copy the same bytes -------------------------------------------------------------


def _swap_after_first_read(monkeypatch: pytest.MonkeyPatch, path: Path, later: bytes) -> list[Path]:
    """Every read of `path` after the first finds `later` on disk: a file swapped between the
    agent's check and its copy (or a second read by OpenSSL)."""
    reads: list[Path] = []
    original = tls._read_file

    def reading(setting: str, where: Path) -> Any:
        got = original(setting, where)
        reads.append(where)
        if where == path:
            path.write_bytes(later)
        return got

    monkeypatch.setattr(tls, "_read_file", reading)
    return reads


def test_a_key_swapped_after_the_check_cannot_go_live(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack: the key read first (and copied) is not the one the match check loads; the
    file is swapped to the matching key right after the agent's read."""
    key = tmp_path / "swapped.key"
    key.write_bytes(pki.other_key.read_bytes())
    key.chmod(0o600)
    reads = _swap_after_first_read(monkeypatch, key, pki.leaf_key.read_bytes())
    with pytest.raises(tls.TlsProblem, match="is not the key of the certificate"):
        tls.check_certificate_pair(pki.leaf, key, "pypi.example.com")
    assert reads.count(key) == 1


def test_a_certificate_swapped_after_the_check_cannot_go_live(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checked certificate (expired, same key) is what is copied; swapping in a good one
    after the read must not make the expired one pass."""
    cert = tmp_path / "swapped.pem"
    cert.write_bytes(pki.expired.read_bytes())
    _swap_after_first_read(monkeypatch, cert, pki.leaf.read_bytes())
    with pytest.raises(tls.TlsProblem, match="expired on"):
        tls.check_certificate_pair(cert, pki.leaf_key, "pypi.example.com")
    # And the other way round: a good one read, a bad key swapped in: the copy is the good one.
    cert.write_bytes(pki.leaf.read_bytes())
    _swap_after_first_read(monkeypatch, cert, b"junk")
    pair = tls.check_certificate_pair(cert, pki.leaf_key, "pypi.example.com")
    assert pair.cert_pem == pki.leaf.read_bytes()


def test_the_acme_root_installed_is_the_one_checked(
    tmp_path: Path, pki: Pki, facts: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = tmp_path / "company-root.pem"
    ca.write_bytes(pki.ca.read_bytes())
    _swap_after_first_read(monkeypatch, ca, b"-----BEGIN CERTIFICATE-----\nnot checked\n")
    root = tmp_path / "host"
    company = config(acme_ca="https://ca.example.com/dir", acme_ca_root=str(ca))
    tls_step.converge(make_ctx(root, company, FakeRunner()))
    assert under(root, tls.ACME_CA_ROOT_COPY).read_bytes() == pki.ca.read_bytes()


@pytest.fixture(scope="module")
def trusted_leaf(pki: Pki) -> bytes:
    """The leaf as OpenSSL's `-trustout` writes it: a TRUSTED CERTIFICATE block."""
    out = openssl("x509", "-in", str(pki.cn_only), "-trustout", "-addtrust", "serverAuth",
                  cwd=pki.dir)  # fmt: skip
    assert "-----BEGIN TRUSTED CERTIFICATE-----" in out
    return out.encode()


def test_trusted_certificate_blocks_are_refused_naming_the_key(
    tmp_path: Path, pki: Pki, trusted_leaf: bytes
) -> None:
    """OpenSSL reads a TRUSTED CERTIFICATE block as a certificate (load_cert_chain takes it
    as the leaf); the parser skipped it and checked the next block instead."""
    cert = tmp_path / "trusted.pem"
    cert.write_bytes(trusted_leaf + pki.leaf.read_bytes())
    with pytest.raises(tls.TlsProblem) as raised:
        tls.check_certificate_pair(cert, pki.leaf_key, "pypi.example.com")
    message = str(raised.value)
    assert f"server.cert_file {cert}" in message and "TRUSTED CERTIFICATE" in message
    cert.write_bytes(trusted_leaf)
    with pytest.raises(tls.TlsProblem, match=r"server.cert_file .*TRUSTED CERTIFICATE"):
        tls.check_certificate_pair(cert, pki.leaf_key, "cn-only.example.com")
    with pytest.raises(tls.TlsProblem, match=r"server.acme_ca_root .*TRUSTED CERTIFICATE"):
        tls.read_certificates("server.acme_ca_root", cert)
