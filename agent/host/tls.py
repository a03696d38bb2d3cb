"""TLS facts: where the domain points, which addresses are this host's, what holds Caddy's ports,
what a certificate file or a served certificate says.

Everything here only looks; the `tls` step (agent/steps/tls.py) decides and acts. The checks
that turn facts into problems are pure functions, so they are tested with made-up facts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from agent.core import direct_http
from agent.core.reading import read_file
from agent.host.x509 import Address, Certificate, CertificateError, load_pem, parse_der

# Where the agent installs what Caddy must read for TLS: copies owned root:caddy, so the
# originals can stay private to root wherever the company's tooling puts them.
CADDY_TLS_DIR = Path("/etc/caddy/tls")
CERT_COPY = CADDY_TLS_DIR / "cert.pem"
KEY_COPY = CADDY_TLS_DIR / "key.pem"
ACME_CA_ROOT_COPY = CADDY_TLS_DIR / "acme-ca-root.pem"

# Caddy's local CA (tls internal), relative to the caddy user's home.
INTERNAL_ROOT = Path(".local/share/caddy/pki/authorities/local/root.crt")

IMDS = "http://169.254.169.254"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TlsProblem(Exception):
    """Something about TLS that must be fixed before Caddy can serve; the message says what."""


# --- where the domain points ------------------------------------------------------------------


class ResolveFailed(Exception):
    pass


def resolve(name: str) -> tuple[Address, ...]:
    """The addresses this host's resolver gives for `name` (/etc/hosts, then DNS), in order."""
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as error:
        raise ResolveFailed(getattr(error, "strerror", None) or str(error)) from None
    addresses: list[Address] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if address not in addresses:
            addresses.append(address)
    return tuple(addresses)


@dataclass(frozen=True)
class HostAddresses:
    """This host's addresses: its own (kernel) and one a cloud's NAT maps to it (EC2)."""

    local: tuple[Network, ...]
    public: tuple[Address, ...] = ()
    public_source: str = ""

    def includes(self, address: Address) -> bool:
        return address in self.public or any(address in network for network in self.local)

    def describe(self) -> str:
        shown = [
            str(n.network_address) if n.num_addresses == 1 else str(n)
            for n in sorted(self.local, key=lambda n: (n.version, n))
        ]
        text = ", ".join(shown) or "none found"
        if self.public:
            text += f"; {self.public_source} " + ", ".join(str(a) for a in self.public)
        return text


def parse_fib_trie(text: str) -> list[ipaddress.IPv4Network]:
    """IPv4 ranges the kernel delivers locally: the `host LOCAL` routes of /proc/net/fib_trie.

    A /32 is one of the host's addresses; a shorter prefix (127.0.0.0/8, AnyIP setups) makes
    the whole range local.
    """
    networks: list[ipaddress.IPv4Network] = []
    last_address: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|--"):
            last_address = stripped[3:].strip()
        elif stripped.endswith("host LOCAL") and stripped.startswith("/") and last_address:
            prefix = stripped.split()[0][1:]
            network = ipaddress.IPv4Network(f"{last_address}/{prefix}", strict=False)
            if network not in networks:
                networks.append(network)
    return networks


def parse_if_inet6(text: str) -> list[ipaddress.IPv6Network]:
    """Every IPv6 address on an interface, from /proc/net/if_inet6 (32 hex digits first)."""
    networks: list[ipaddress.IPv6Network] = []
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            address = ipaddress.IPv6Address(int(fields[0], 16))
            networks.append(ipaddress.IPv6Network(address))
    return networks


def interface_networks(proc: Path = Path("/proc")) -> tuple[Network, ...]:
    networks: list[Network] = []
    with contextlib.suppress(OSError):
        networks.extend(parse_fib_trie((proc / "net/fib_trie").read_text()))
    with contextlib.suppress(OSError):  # IPv6 may be disabled
        networks.extend(parse_if_inet6((proc / "net/if_inet6").read_text()))
    return tuple(networks)


def on_ec2(sys_root: Path = Path("/sys")) -> bool:
    """EC2 says so in DMI (Nitro) or in the Xen hypervisor UUID (older types): no network needed."""
    for relative, marker in (
        ("class/dmi/id/sys_vendor", "Amazon EC2"),
        ("class/dmi/id/board_vendor", "Amazon EC2"),
        ("hypervisor/uuid", "ec2"),
    ):
        try:
            if (sys_root / relative).read_text().strip().lower().startswith(marker.lower()):
                return True
        except OSError:
            continue
    return False


def ec2_public_ipv4(base: str = IMDS, timeout: float = 1.0) -> Address | None:
    """The public IPv4 EC2's NAT maps to this instance, from the metadata service (IMDSv2).

    None without one (private subnet) or when the metadata service does not answer in time.
    """
    # The metadata service is link-local: a configured HTTP proxy must never see this.
    try:
        token_request = urllib.request.Request(
            f"{base}/latest/api/token",
            method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
        )
        with direct_http.urlopen(token_request, timeout=timeout) as response:
            token = response.read().decode().strip()
        request = urllib.request.Request(
            f"{base}/latest/meta-data/public-ipv4",
            headers={"X-aws-ec2-metadata-token": token},
        )
        with direct_http.urlopen(request, timeout=timeout) as response:
            return ipaddress.ip_address(response.read().decode().strip())
    except (OSError, ValueError, urllib.error.URLError):
        return None


def host_addresses(
    proc: Path = Path("/proc"), sys_root: Path = Path("/sys"), imds: str = IMDS
) -> HostAddresses:
    local = interface_networks(proc)
    if on_ec2(sys_root):
        public = ec2_public_ipv4(imds)
        if public is not None:
            return HostAddresses(local, (public,), "EC2 public IPv4")
    return HostAddresses(local)


def domain_problem(
    domain: str,
    resolved: tuple[Address, ...] | ResolveFailed,
    host: HostAddresses,
    *,
    public_ca: bool = True,
) -> str | None:
    """Why an ACME CA could not reach this host under `domain`; None when it could.

    A public CA (Let's Encrypt) resolves the name through public DNS and connects over the
    internet, so only a public address of this host counts; a company's CA (acme_ca) may well
    reach private ones.
    """
    fix = (
        "fix the DNS record, or set server.acme_preflight = false if a NAT or load balancer "
        "forwards the ports here"
    )
    if isinstance(resolved, ResolveFailed):
        return (
            f"server.domain {domain} does not resolve ({resolved}); this host's addresses: "
            f"{host.describe()}. The ACME CA could not reach it: {fix}"
        )
    found = ", ".join(str(a) for a in resolved)
    here = [address for address in resolved if host.includes(address)]
    if not here:
        return (
            f"server.domain {domain} resolves to {found}, not to this host "
            f"(its addresses: {host.describe()}). The ACME CA would reach another machine and "
            f"Caddy would retry into the CA's rate limits: {fix}"
        )
    if public_ca and not any(address.is_global for address in here):
        return (
            f"server.domain {domain} resolves to {found}: this host, but no public address "
            f"(its addresses: {host.describe()}). The public ACME CA looks the name up in public "
            f"DNS (an /etc/hosts entry does not count) and connects over the internet: {fix}, "
            f'or use server.acme_ca (a company CA), tls = "files" or tls = "internal"'
        )
    return None


def public_ports_problem(http_port: int, https_port: int) -> str | None:
    """Public CAs validate on ports 80 (HTTP-01) and 443 (TLS-ALPN-01) only."""
    if http_port == 80 or https_port == 443:
        return None
    return (
        f"with the public ACME CA the certificate is validated on port 80 or 443, but Caddy "
        f"listens on {https_port} (https) and {http_port or 'no'} (http): set "
        f"server.http_port = 80 or server.https_port = 443, set server.acme_ca to a CA that "
        f"validates elsewhere, or server.acme_preflight = false if a NAT forwards 80/443 here"
    )


# --- what holds the ports ---------------------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    """A socket listening on a TCP port, and the process holding it if this host can see it."""

    port: int
    address: str
    inode: int
    pid: int | None = None
    program: str | None = None

    @property
    def is_caddy(self) -> bool:
        return self.program == "caddy"

    def describe(self) -> str:
        if self.pid is None:
            return f"a process outside this host's view (socket inode {self.inode})"
        return f"{self.program} (pid {self.pid})"


_TCP_LISTEN = "0A"


def parse_proc_net_tcp(text: str) -> list[tuple[str, int, int]]:
    """(address, port, inode) of every listening socket in /proc/net/tcp or tcp6."""
    sockets = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _TCP_LISTEN:
            continue
        address_hex, port_hex = fields[1].split(":")
        raw = bytes.fromhex(address_hex)
        # The kernel prints each 32-bit word in host (little-endian) order.
        words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
        sockets.append((str(ipaddress.ip_address(words)), int(port_hex, 16), int(fields[9])))
    return sockets


def socket_holders(inodes: set[int], proc: Path = Path("/proc")) -> dict[int, tuple[int, str]]:
    """inode -> (pid, program name) for the sockets this host's processes hold (needs root)."""
    holders: dict[int, tuple[int, str]] = {}
    if not inodes:
        return holders
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                inode = wanted.get(os.readlink(fd))
                if inode is not None and inode not in holders:
                    program = (entry / "comm").read_text().strip()
                    holders[inode] = (int(entry.name), program)
        except OSError:
            continue  # gone, or not ours to look at
    return holders


def listeners(ports: Iterable[int], proc: Path = Path("/proc")) -> list[Listener]:
    wanted = set(ports)
    found: list[tuple[str, int, int]] = []
    for table in ("net/tcp", "net/tcp6"):
        try:
            found.extend(parse_proc_net_tcp((proc / table).read_text()))
        except OSError:
            continue
    found = [item for item in found if item[1] in wanted]
    holders = socket_holders({inode for _, _, inode in found}, proc)
    result = []
    for address, port, inode in found:
        pid, program = holders.get(inode, (None, None))
        result.append(Listener(port, address, inode, pid, program))
    return result


def port_problems(found: Sequence[Listener], ports: dict[int, str]) -> list[str]:
    """A problem per configured port (port -> setting name) held by anything but Caddy."""
    problems = []
    for port, setting in sorted(ports.items()):
        others = [listener for listener in found if listener.port == port and not listener.is_caddy]
        if others:
            holders = ", ".join(sorted({listener.describe() for listener in others}))
            problems.append(
                f"port {port} ({setting}) is already held by {holders}: Caddy cannot listen "
                f"there; stop it or choose another port"
            )
    return problems


# --- certificate files (tls = "files") --------------------------------------------------------


@dataclass(frozen=True)
class CertificatePair:
    leaf: Certificate
    chain_length: int
    cert_pem: bytes
    key_pem: bytes = field(repr=False)


def _read_file(setting: str, path: Path) -> tuple[bytes, int]:
    """The bytes of `path` and its mode, from one open: what is checked is what gets copied."""
    return read_file(setting, path, TlsProblem)


def read_certificates(setting: str, path: Path) -> list[Certificate]:
    return read_pem_certificates(setting, path)[0]


def read_pem_certificates(setting: str, path: Path) -> tuple[list[Certificate], bytes]:
    """The certificates in `path` and the very bytes they were read from (to copy those)."""
    data, _ = _read_file(setting, path)
    try:
        return load_pem(data), data
    except CertificateError as error:
        raise TlsProblem(f"{setting} {path}: {error}") from None


def _load_cert_chain(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """load_cert_chain of these bytes, not of the files again (they may have changed since they
    were read): memory-only files, reached through /proc/self/fd."""
    cert_fd = os.memfd_create("devpi-agent-cert", os.MFD_CLOEXEC)
    key_fd = os.memfd_create("devpi-agent-key", os.MFD_CLOEXEC)
    try:
        os.write(cert_fd, cert_pem)
        os.write(key_fd, key_pem)
        # An empty password makes an encrypted key fail instead of prompting on a terminal.
        context.load_cert_chain(f"/proc/self/fd/{cert_fd}", f"/proc/self/fd/{key_fd}", password="")
    finally:
        os.close(cert_fd)
        os.close(key_fd)


def check_certificate_pair(
    cert_file: Path, key_file: Path, domain: str, now: datetime | None = None
) -> CertificatePair:
    """The pair Caddy would serve, checked: key private and matching, name covered, in date.

    Each file is read once; every check runs on those bytes, and they are what gets copied."""
    now = now or datetime.now(timezone.utc)
    cert_pem, _ = _read_file("server.cert_file", cert_file)
    try:
        chain = load_pem(cert_pem)
    except CertificateError as error:
        raise TlsProblem(f"server.cert_file {cert_file}: {error}") from None
    leaf = chain[0]
    key_pem, mode = _read_file("server.key_file", key_file)
    if mode & 0o007:
        raise TlsProblem(
            f"server.key_file {key_file} is open to every user (mode {mode:04o}): "
            f"chmod 600 it (the agent gives Caddy its own copy)"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        _load_cert_chain(context, cert_pem, key_pem)
    except ssl.SSLError as error:
        if "KEY_VALUES_MISMATCH" in str(error):
            raise TlsProblem(
                f"server.key_file {key_file} is not the key of the certificate in "
                f"server.cert_file {cert_file} ({leaf.subject}, issued by {leaf.issuer})"
            ) from None
        raise TlsProblem(
            f"server.key_file {key_file} cannot be used as the key of {cert_file}: it must be "
            f"an unencrypted PEM private key ({error.reason or error})"
        ) from None
    names = ", ".join(leaf.names) or "none"
    if not leaf.covers(domain):
        raise TlsProblem(
            f"the certificate in server.cert_file {cert_file} does not cover server.domain "
            f"{domain}: its names are {names} ({leaf.subject}, issued by {leaf.issuer})"
        )
    if now >= leaf.not_after:
        raise TlsProblem(
            f"the certificate in server.cert_file {cert_file} expired on "
            f"{leaf.not_after:%Y-%m-%d %H:%M} UTC ({leaf.subject}, issued by {leaf.issuer})"
        )
    if now < leaf.not_before:
        raise TlsProblem(
            f"the certificate in server.cert_file {cert_file} is not valid before "
            f"{leaf.not_before:%Y-%m-%d %H:%M} UTC (check this host's clock)"
        )
    return CertificatePair(leaf, len(chain), cert_pem, key_pem)


# --- what a server serves (for `verify`) ------------------------------------------------------


@dataclass(frozen=True)
class CertInfo:
    """The certificate a TLS server presents, and whether a client trusting `cafile` accepts it."""

    subject: str
    issuer: str
    names: tuple[str, ...]
    serial: int
    not_after: datetime
    days_left: int
    chain_ok: bool
    verify_error: str | None
    sha256: str

    def as_json(self) -> dict[str, object]:
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "names": list(self.names),
            "not_after": self.not_after.isoformat(),
            "days_left": self.days_left,
            "chain_ok": self.chain_ok,
            "verify_error": self.verify_error,
            "sha256": self.sha256,
        }

    def __str__(self) -> str:
        return json.dumps(self.as_json())


def _peer_der(
    context: ssl.SSLContext, host: str, port: int, server_name: str, timeout: float
) -> bytes:
    with (
        socket.create_connection((host, port), timeout=timeout) as sock,
        context.wrap_socket(sock, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError(f"{host}:{port} presented no certificate")
    return der


def served_certificate(
    host: str,
    port: int,
    server_name: str,
    *,
    cafile: Path | str | None = None,
    timeout: float = 10.0,
    now: datetime | None = None,
) -> CertInfo:
    """Connect to host:port with SNI `server_name` and describe the certificate served.

    chain_ok: a client trusting `cafile` (default: the system store) accepts the chain for
    `server_name`; verify_error says why not. Connection errors (OSError) propagate.
    """
    verifying = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    chain_ok, verify_error = True, None
    try:
        der = _peer_der(verifying, host, port, server_name, timeout)
    except ssl.SSLCertVerificationError as error:
        chain_ok, verify_error = False, error.verify_message or str(error)
        looking = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        looking.check_hostname = False
        looking.verify_mode = ssl.CERT_NONE
        der = _peer_der(looking, host, port, server_name, timeout)
    leaf = parse_der(der)
    return CertInfo(
        subject=leaf.subject,
        issuer=leaf.issuer,
        names=leaf.names,
        serial=leaf.serial,
        not_after=leaf.not_after,
        days_left=leaf.days_left(now or datetime.now(timezone.utc)),
        chain_ok=chain_ok,
        verify_error=verify_error,
        sha256=leaf.sha256,
    )


def internal_root(caddy_home: str | Path) -> Path:
    """Caddy's local CA root certificate (tls internal) for the caddy user's home."""
    return Path(caddy_home) / INTERNAL_ROOT
