"""Client certificates for replication: a CA the primary keeps, one certificate per replica.

devpi signs a replica's requests with the shared secret, but Caddy cannot check that signature,
and devpi serves reads to a caller whose signature it rejects as to anyone anonymous. So the
primary's replication site admits a connection only with a client certificate the agent issued
to a replica named in `devpi.replicas` (Caddy's `client_auth`, then a pin of each certificate's
SHA-256 in the site's matcher: removing a name revokes it). devpi-server's own HTTP client has no
client-certificate option, so on a replica its Caddy presents the certificate: devpi talks plain
HTTP to a loopback site that proxies to the primary (units/Caddyfile.j2).

Keys are made and signed by `openssl` (the agent uses no crypto library); key material only ever
sits in root-only files, never in argv or a log.
"""

from __future__ import annotations

import re
import secrets
import ssl
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from agent import x509
from agent.runner import Runner

# The CA's certificate and key in one root-only file, so a run killed mid-write never leaves a
# key without its certificate.
CA_FILE = Path("/etc/devpi-agent/replication-ca.pem")
# What a primary hands each replica: its certificate and key, one root-only file per name.
ISSUED_DIR = Path("/etc/devpi-agent/replicas")
# Ten years: renewing means copying a new file to the replica, which the agent cannot do itself.
VALIDITY_DAYS = 3650
CA_SUBJECT_PREFIX = "devpi-agent replication CA"

_PEM_KEY = re.compile(
    rb"-----BEGIN (?P<kind>(?:EC |RSA |ENCRYPTED )?PRIVATE KEY)-----.+?-----END (?P=kind)-----\s*",
    re.S,
)
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*", re.S)


class PkiProblem(Exception):
    """A certificate or key the replication set-up cannot use; the message says why."""


@dataclass(frozen=True)
class Bundle:
    """A certificate with its private key, as one PEM file holds them."""

    certificate: x509.Certificate
    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    @property
    def pem(self) -> bytes:
        return self.cert_pem + self.key_pem

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the certificate's DER, as Caddy's {http.request.tls.client.fingerprint}."""
        return self.certificate.sha256


def issued_file(name: str) -> Path:
    return ISSUED_DIR / f"{name}.pem"


def parse_bundle(data: bytes, what: str) -> Bundle:
    """Exactly one certificate and one unencrypted private key, in PEM; the key checked to be
    the certificate's (by OpenSSL, through `ssl`, from a private copy of these very bytes)."""
    certs = _PEM_CERT.findall(data)
    keys = list(_PEM_KEY.finditer(data))
    if len(certs) != 1 or len(keys) != 1:
        raise PkiProblem(
            f"{what} must hold one certificate and its private key in PEM "
            f"(found {len(certs)} certificates and {len(keys)} keys)"
        )
    if keys[0]["kind"] == b"ENCRYPTED PRIVATE KEY":
        raise PkiProblem(f"{what}: the private key is encrypted; Caddy needs it unencrypted")
    try:
        certificate = x509.load_pem(certs[0])[0]
    except x509.CertificateError as error:
        raise PkiProblem(f"{what}: {error}") from None
    cert_pem, key_pem = certs[0].strip() + b"\n", keys[0][0].strip() + b"\n"
    with tempfile.TemporaryDirectory(prefix="devpi-agent-pki-") as scratch:
        copy = Path(scratch) / "bundle.pem"
        copy.touch(mode=0o600)
        copy.write_bytes(cert_pem + key_pem)
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(str(copy), password="")
        except ssl.SSLError as error:
            if "KEY_VALUES_MISMATCH" in str(error):
                raise PkiProblem(f"{what}: the private key is not the certificate's") from None
            raise PkiProblem(f"{what}: unusable key ({error.reason or error})") from None
    return Bundle(certificate, cert_pem, key_pem)


def in_date(bundle: Bundle, what: str, now: datetime | None = None) -> None:
    now = now or datetime.now(timezone.utc)
    leaf = bundle.certificate
    if now >= leaf.not_after:
        raise PkiProblem(f"{what}: the certificate expired on {leaf.not_after:%Y-%m-%d} UTC")
    if now < leaf.not_before:
        raise PkiProblem(
            f"{what}: the certificate is not valid before {leaf.not_before:%Y-%m-%d %H:%M} UTC "
            "(check this host's clock)"
        )


def _openssl(runner: Runner, *args: str) -> None:
    runner.run(["openssl", *args], timeout=60)


def new_ca(runner: Runner) -> Bundle:
    """A fresh CA (P-256). Its name carries a random tag, so certificates of an earlier CA are
    told apart by their issuer without a signature check."""
    subject = f"/CN={CA_SUBJECT_PREFIX} {secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="devpi-agent-pki-") as scratch:
        key, cert = Path(scratch) / "ca.key", Path(scratch) / "ca.pem"
        _openssl(
            runner, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", str(VALIDITY_DAYS),
            "-subj", subject, "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        return parse_bundle(cert.read_bytes() + key.read_bytes(), "the new replication CA")


def issue(runner: Runner, ca: Bundle, name: str) -> Bundle:
    """A client certificate for replica `name`, signed by `ca`."""
    with tempfile.TemporaryDirectory(prefix="devpi-agent-pki-") as scratch:
        work = Path(scratch)
        ca_file = work / "ca.pem"
        ca_file.touch(mode=0o600)
        ca_file.write_bytes(ca.pem)
        (work / "ext.cnf").write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=clientAuth\n"
        )
        _openssl(
            runner, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(work / "leaf.key"), "-out", str(work / "leaf.csr"),
            "-subj", f"/CN=devpi replica {name}",
        )  # fmt: skip
        _openssl(
            runner, "x509", "-req", "-in", str(work / "leaf.csr"), "-CA", str(ca_file),
            "-CAkey", str(ca_file), "-set_serial", f"0x{secrets.token_hex(16)}",
            "-days", str(VALIDITY_DAYS), "-extfile", str(work / "ext.cnf"),
            "-out", str(work / "leaf.pem"),
        )  # fmt: skip
        data = (work / "leaf.pem").read_bytes() + (work / "leaf.key").read_bytes()
        return parse_bundle(data, f"the new certificate of replica {name}")


def issued_by(bundle: Bundle, ca: Bundle) -> bool:
    return bundle.certificate.issuer == ca.certificate.subject
