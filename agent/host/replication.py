"""devpi's own replication (docs/scaling.md), as the agent sets it up and checks it.

A primary runs devpi with `role: primary`; Caddy's replication site lets the replica hosts reach
it. A replica runs devpi with `role: replica` and `primary-url`, pulls the primary's changelog and
files, and relays writes to it. Both sign and check the replicas' requests with devpi's secret,
so they must share it: the operator provides it as `devpi.secret_file`.

The steps call in here for the parts that differ by role; `verify` for the replication checks.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from agent.core import direct_http
from agent.core.config import Config
from agent.core.context import Context, StepFailed
from agent.core.log import redactor
from agent.core.netaddr import url_host
from agent.core.paths import DEVPI_LOG, DEVPI_RESTART, SYSTEM_CA_BUNDLE
from agent.host import replica_pki, tls
from agent.host.devpi_api import DevpiApi, DevpiError
from agent.host.replica_pki import Bundle, PkiProblem

# The system roots plus primary_ca_file: what a replica's devpi trusts (REQUESTS_CA_BUNDLE).
PRIMARY_CA_BUNDLE = Path("/etc/devpi-server/primary-ca-bundle.pem")
# Caddy's copies for replication: a primary's CA certificate (client_auth trusts it); a
# replica's client certificate and key, and its primary's CA (primary_ca_file).
REPLICA_CA_COPY = tls.CADDY_TLS_DIR / "replica-ca.pem"
CLIENT_CERT_COPY = tls.CADDY_TLS_DIR / "replica-client.pem"
CLIENT_KEY_COPY = tls.CADDY_TLS_DIR / "replica-client.key"
PRIMARY_CA_COPY = tls.CADDY_TLS_DIR / "primary-ca.pem"
CADDY_COPIES = (REPLICA_CA_COPY, CLIENT_CERT_COPY, CLIENT_KEY_COPY, PRIMARY_CA_COPY)
PRIVATE_COPIES = (CLIENT_KEY_COPY,)
# The supervisor step's marker (it imports this module, so the name is repeated here).
# A fresh replica's first pull: the first signed request costs an argon2 key derivation on both
# sides (20-30 s on a busy 2-core host), then the changelog streams in.
FIRST_SYNC_TIMEOUT = 240.0
# verify: how long a replica may take to reach the serial the primary just reported.
LAG_GRACE_SECONDS = 30.0


def is_replica(config: Config) -> bool:
    return config.devpi.role == "replica"


def ca_bundle(config: Config) -> str:
    """The CA file devpi-server's HTTP client trusts (it reads REQUESTS_CA_BUNDLE)."""
    if is_replica(config) and config.devpi.primary_ca_file is not None:
        return str(PRIMARY_CA_BUNDLE)
    return str(SYSTEM_CA_BUNDLE)


def primary_host(config: Config) -> str:
    return urllib.parse.urlsplit(config.devpi.primary_url or "").hostname or "the primary"


def primary_upstream(config: Config) -> str:
    """primary_url as Caddy's upstream, rebuilt from its parts (ValueError if it has none, or
    credentials: config refuses those, and "https://host:port@other" would name `other`)."""
    parts = urllib.parse.urlsplit(config.devpi.primary_url or "")
    host, port = parts.hostname, parts.port or 443
    if parts.scheme != "https" or not host or "@" in parts.netloc:
        raise ValueError(f"not an https:// URL without credentials: {config.devpi.primary_url!r}")
    return f"https://{url_host(host)}:{port}"


def primary_proxy_url(config: Config) -> str:
    """Where a replica's devpi reaches its primary: its own Caddy, which adds the certificate."""
    return f"http://127.0.0.1:{config.devpi.primary_proxy_port}"


# --- certificates -----------------------------------------------------------------------------


def converge_certificates(ctx: Context) -> dict[Path, bytes]:
    """A primary's CA and one certificate per replica in devpi.replicas (made or kept here, in
    root-only files); a replica's certificate checked. Returns the copies Caddy reads."""
    devpi = ctx.config.devpi
    try:
        if devpi.role == "primary":
            ca = _ensure_ca(ctx)
            if ca is None:
                return {}
            for name in devpi.replicas:
                _ensure_issued(ctx, ca, name)
            _remove_unlisted(ctx)
            return {REPLICA_CA_COPY: ca.cert_pem}
        if devpi.role == "replica":
            assert devpi.replica_cert is not None and devpi.replica_cert_file is not None
            what = f"devpi.replica_cert_file {devpi.replica_cert_file}"
            bundle = replica_pki.parse_bundle(devpi.replica_cert, what)
            replica_pki.in_date(bundle, what)
            ctx.log.info(
                "replica certificate",
                subject=bundle.certificate.subject,
                issuer=bundle.certificate.issuer,
                not_after=bundle.certificate.not_after.isoformat(),
            )
            wanted = {CLIENT_CERT_COPY: bundle.cert_pem, CLIENT_KEY_COPY: bundle.key_pem}
            if devpi.primary_ca_file is not None:
                roots = tls.read_certificates("devpi.primary_ca_file", devpi.primary_ca_file)
                wanted[PRIMARY_CA_COPY] = "".join(
                    ssl.DER_cert_to_PEM_cert(root.der) for root in roots
                ).encode()
            return wanted
    except PkiProblem as problem:
        raise StepFailed(str(problem)) from None
    except tls.TlsProblem as problem:
        raise StepFailed(str(problem)) from None
    return {}


def _read_bundle(ctx: Context, path: Path) -> Bundle | None:
    real = ctx.files.host_path(path)
    try:
        return replica_pki.parse_bundle(real.read_bytes(), str(path))
    except FileNotFoundError:
        return None
    except (OSError, PkiProblem) as problem:
        ctx.log.warning("unusable, made anew", path=str(path), reason=str(problem))
        return None


def _ensure_ca(ctx: Context) -> Bundle | None:
    ca = _read_bundle(ctx, replica_pki.CA_FILE)
    if ca is not None:
        return ca
    if not ctx.change(f"make the replication CA in {replica_pki.CA_FILE}"):
        return None
    ca = replica_pki.new_ca(ctx.runner)
    ctx.files.ensure_file(replica_pki.CA_FILE, ca.pem, mode=0o600, secret=True)
    return ca


def _ensure_issued(ctx: Context, ca: Bundle, name: str) -> None:
    path = replica_pki.issued_file(name)
    current = _read_bundle(ctx, path)
    if current is not None and replica_pki.issued_by(current, ca):
        try:
            replica_pki.in_date(current, str(path))
            return
        except PkiProblem:
            pass
    if not ctx.change(
        f"issue the client certificate of replica {name} in {path}",
        note="copy it to the replica as its devpi.replica_cert_file",
    ):
        return
    ctx.files.ensure_dir(replica_pki.ISSUED_DIR, mode=0o700)
    bundle = replica_pki.issue(ctx.runner, ca, name)
    ctx.files.ensure_file(path, bundle.pem, mode=0o600, secret=True)
    ctx.log.info("replica certificate issued", replica=name, sha256=bundle.fingerprint)


def _remove_unlisted(ctx: Context) -> None:
    issued = ctx.files.host_path(replica_pki.ISSUED_DIR)
    if not issued.is_dir():
        return
    for found in sorted(issued.glob("*.pem")):
        if found.stem not in ctx.config.devpi.replicas:
            path = replica_pki.ISSUED_DIR / found.name
            if ctx.change(f"revoke replica {found.stem}: remove {path}"):
                ctx.files.remove(path)


def replica_fingerprints(ctx: Context) -> list[str]:
    """The SHA-256 of each certificate issued to a replica in devpi.replicas (for Caddy)."""
    prints = []
    for name in ctx.config.devpi.replicas:
        bundle = _read_bundle(ctx, replica_pki.issued_file(name))
        if bundle is not None:
            prints.append(bundle.fingerprint)
    return prints


# --- apply ------------------------------------------------------------------------------------


def converge_ca_bundle(ctx: Context) -> None:
    """A replica whose primary has a private CA trusts it, on top of the system roots (devpi
    still fetches from PyPI itself when the primary cannot hand it a mirror file)."""
    devpi = ctx.config.devpi
    if ca_bundle(ctx.config) != str(PRIMARY_CA_BUNDLE):
        ctx.files.remove(PRIMARY_CA_BUNDLE)
        return
    assert devpi.primary_ca_file is not None
    try:
        roots, checked = tls.read_pem_certificates("devpi.primary_ca_file", devpi.primary_ca_file)
    except tls.TlsProblem as problem:
        raise StepFailed(str(problem)) from None
    ctx.log.info("primary CA", path=str(devpi.primary_ca_file), subject=roots[0].subject)
    system = ctx.files.read(SYSTEM_CA_BUNDLE) or ""
    wanted = system.rstrip("\n") + "\n" + checked.decode("utf-8", "replace").strip() + "\n"
    if ctx.files.read(PRIMARY_CA_BUNDLE) != wanted:
        # devpi loads its CA file once, at start.
        ctx.mark_pending(DEVPI_RESTART)
    ctx.write(PRIMARY_CA_BUNDLE, wanted, mode=0o644)


def converge_secret(ctx: Context) -> None:
    """devpi.secret_file, byte for byte, as devpi's secret (0600, the service user's)."""
    devpi = ctx.config.devpi
    if devpi.secret is None:
        return
    redactor.add(devpi.secret.decode("utf-8", "replace").strip())
    current = ctx.files.host_path(devpi.secretfile)
    differs = not current.exists() or current.read_bytes() != devpi.secret
    if differs and ctx.files.exists(devpi.serverdir / ".nodeinfo"):
        # devpi reads its secret at start; a running one keeps signing with the old one.
        ctx.mark_pending(DEVPI_RESTART)
    ctx.write(
        devpi.secretfile, devpi.secret, mode=0o600, owner=devpi.user, group=devpi.user, secret=True
    )


def server_dir_role(ctx: Context) -> str | None:
    """The role devpi recorded in the server dir (.nodeinfo); None before devpi-init."""
    text = ctx.files.read(ctx.config.devpi.serverdir / ".nodeinfo")
    if text is None:
        return None
    try:
        role = json.loads(text).get("role")
    except (ValueError, AttributeError):
        return None
    return str(role) if role else None


def check_server_dir_role(ctx: Context) -> None:
    """devpi turns a standalone server into a primary and a replica into a primary (promotion),
    but never a server with data of its own into a replica; and a replica dir without an
    explicit role keeps following its primary. Say so before devpi does something else."""
    role = server_dir_role(ctx)
    wanted = ctx.config.devpi.role
    serverdir = ctx.config.devpi.serverdir
    if role is None or role == wanted:
        return
    if wanted == "replica":
        raise StepFailed(
            f"{serverdir} holds a {role} devpi server; a replica starts from an empty server "
            "dir and copies everything from the primary: move that directory away (the agent "
            "never deletes data) and apply again"
        )
    if role == "replica" and wanted == "standalone":
        raise StepFailed(
            f"{serverdir} holds a replica, which devpi would keep running as one: to promote it, "
            'set devpi.role = "primary" (docs/scaling.md); for a new standalone server, move '
            "that directory away and apply again"
        )
    if role == "replica":
        ctx.log.warning(
            "promoting this replica",
            serverdir=str(serverdir),
            note="it stops following its primary and takes writes itself",
        )
    elif role == "primary":
        ctx.log.warning("devpi stops serving replication", serverdir=str(serverdir), role=wanted)


def devpi_status(port: int, timeout: float = 15) -> dict[str, Any]:
    """devpi's own /+status (serial, role, replication state), on loopback."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/+status", headers={"Accept": "application/json"}
    )
    with direct_http.urlopen(request, timeout=timeout) as response:
        result: dict[str, Any] = json.load(response)["result"]
        return result


def _recent_replication_log(ctx: Context, lines: int = 6) -> str:
    text = ctx.files.read(DEVPI_LOG) or ""
    picked = [line for line in text.splitlines() if "[REP]" in line or "[FREP]" in line]
    return "\n".join(picked[-lines:]) or "(no replication lines in the devpi-server log)"


def wait_for_first_sync(
    ctx: Context, timeout: float = FIRST_SYNC_TIMEOUT, known_timeout: float = 15.0
) -> None:
    """Bounded wait until the replica has caught up with its primary. A replica that holds
    nothing yet must get there (or the step fails, with devpi's reasons); one that synced
    before serves what it holds meanwhile, so it gets a short wait and a warning."""
    port = ctx.config.devpi.port
    started = time.monotonic()
    fresh: bool | None = None
    status: dict[str, Any] = {}
    while True:
        try:
            status = devpi_status(port)
        except (OSError, ValueError, KeyError):
            status = {}
        serial = int(status.get("serial", -1))
        if fresh is None and status:
            fresh = serial < 0
        if status.get("replica-metadata-in-sync-at") is not None:
            ctx.log.info(
                "replica in sync with its primary",
                serial=serial,
                primary_serial=status.get("primary-serial"),
                seconds=round(time.monotonic() - started, 1),
            )
            return
        waited = time.monotonic() - started
        if waited > (timeout if fresh is not False else known_timeout):
            if serial >= 0:
                ctx.log.warning(
                    "replica behind its primary; it keeps pulling by itself",
                    serial=serial,
                    primary_serial=status.get("primary-serial"),
                    primary=ctx.config.devpi.primary_url,
                )
                return
            raise StepFailed(
                f"this replica got nothing from its primary {ctx.config.devpi.primary_url} in "
                f"{waited:.0f} s: is this host's address in the primary's "
                "devpi.replica_addresses, its replication_port reachable from here, "
                "devpi.replica_cert_file the certificate the primary issued for a name still "
                "in its devpi.replicas, the same secret on both? devpi-server's last "
                "replication lines:\n" + _recent_replication_log(ctx)
            )
        time.sleep(1)


def report_replicated_users(ctx: Context) -> None:
    """A replica gets users and indexes from its primary (and relays changes there): nothing is
    made here; declared ones the primary lacks are named, since their logins would fail."""
    primary = ctx.config.devpi.primary_url
    try:
        remote = DevpiApi(ctx.config.devpi.port).users()
    except (DevpiError, OSError):
        return
    missing = [u.name for u in ctx.config.users if u.name not in remote] + [
        i.name
        for i in ctx.config.indexes
        if i.user not in remote or i.index not in remote[i.user].indexes
    ]
    if missing:
        ctx.log.warning(
            "replica: declared here but not on the primary (apply them there)",
            primary=primary,
            missing=missing,
        )
    else:
        ctx.log.info("replica: all declared users and indexes are here", primary=primary)


# --- verify -----------------------------------------------------------------------------------


def primary_status(config: Config, timeout: float = 20) -> dict[str, Any]:
    """The primary's /+status as this replica's devpi reaches it: through Caddy's loopback
    site, which presents the replica's certificate (and checks the primary's)."""
    request = urllib.request.Request(
        f"{primary_proxy_url(config)}/+status", headers={"Accept": "application/json"}
    )
    # Caddy's site on loopback: a proxy in between would break it and see the replica's data.
    with direct_http.urlopen(request, timeout=timeout) as response:
        result: dict[str, Any] = json.load(response)["result"]
        return result


def _age(timestamp: object, now: float) -> str:
    if not isinstance(timestamp, int | float):
        return "never"
    return f"{max(now - timestamp, 0):.0f} s ago"


def replica_verdict(config: Config, wait: float = LAG_GRACE_SECONDS) -> tuple[bool, str]:
    """Replication lag: this replica's serial against the serial the primary reports now."""
    port = config.devpi.port
    local = devpi_status(port)
    if local.get("role") != "REPLICA":
        return False, f"devpi runs as {local.get('role')}, not as a replica"
    heard = _age(local.get("update-from-primary-at"), time.time())
    try:
        primary = primary_status(config)
        primary_serial = int(primary["serial"])
    except (OSError, http.client.HTTPException, ValueError, KeyError) as error:
        reason = getattr(error, "reason", None) or error
        return False, (
            f"the primary {config.devpi.primary_url} does not answer ({reason}); this replica "
            f"serves what it holds, serial {local.get('serial')}, last reply from the primary "
            f"{heard}"
        )
    followed, current = local.get("primary-uuid"), primary.get("uuid")
    if followed and current and followed != current:
        # devpi-import (a restore, an upgrade by export/import) gives the primary a new identity;
        # the replica's devpi then exits on every contact.
        return False, (
            f"the primary is another server now (uuid {current}, this replica copied {followed}):"
            f" restored or upgraded by export/import? Start this replica over: move "
            f"{config.devpi.serverdir} away and apply"
        )
    started = time.monotonic()
    serial = int(local.get("serial", -1))
    while serial < primary_serial and time.monotonic() - started < wait:
        time.sleep(0.5)
        local = devpi_status(port)
        serial = int(local.get("serial", -1))
    waited = time.monotonic() - started
    behind = primary_serial - serial
    if behind > 0:
        return False, (
            f"{behind} changes behind the primary after {wait:.0f} s (serial {serial}, primary "
            f"{primary_serial}); last reply from the primary {heard}"
        )
    errors = local.get("replication-errors") or {}
    if errors:
        first = next(iter(errors.values()))
        return False, (
            f"in sync at serial {serial}, but {len(errors)} files failed to copy, e.g. "
            f"{first.get('relpath')}: {first.get('message')}"
        )
    caught_up = f", caught up in {waited:.1f} s" if waited >= 0.05 else ""
    # Files follow the changelog in the background; until then a replica fetches a missing one
    # from the primary when asked, so it is no failure, but a promotion would lack them.
    files = (
        "files in sync"
        if local.get("replica-files-in-sync-at") is not None
        else "files still being copied"
    )
    return True, (
        f"serial {serial}, primary at {primary_serial}: lag 0{caught_up}, {files}; "
        f"last reply from the primary {heard}"
    )


def _replication_port_answer(config: Config, timeout: float = 15) -> str | None:
    """What Caddy's replication site gives this host without a client certificate: None when
    it refuses the TLS handshake (as it must), else the HTTP status line it answered with."""
    server = config.server
    port = config.devpi.replication_port
    assert port is not None
    context = ssl.create_default_context()
    # Trust is tls-certificate's business (the same certificate); this looks at the answer.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout) as raw,
            context.wrap_socket(raw, server_hostname=server.domain) as sock,
        ):
            host = url_host(server.domain)
            sock.sendall(
                f"GET /+api HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
                "User-Agent: devpi-agent-verify\r\n\r\n".encode()
            )
            response = http.client.HTTPResponse(sock)
            response.begin()
            return f"HTTP {response.status}"
    except ssl.SSLError:
        # TLS 1.3 reports a refused client certificate on the first read, 1.2 in the handshake.
        return None
    except (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError):
        return None


def primary_verdict(ctx: Context) -> tuple[bool, str]:
    """A primary: devpi serves the replication protocol, Caddy guards its port, and which
    replicas polled it lately at which serial."""
    config = ctx.config
    role = server_dir_role(ctx)
    if role != "primary":
        return False, (
            f"devpi's server dir is {role or 'not initialised'}, not primary: replicas get "
            "nothing (devpi-agent apply restarts devpi with role primary)"
        )
    answer = _replication_port_answer(config)
    port = config.devpi.replication_port
    if answer is not None:
        return False, (
            f"port {port} answers {answer} to a client without a replica certificate: it must "
            "refuse the TLS handshake (devpi-agent apply writes that Caddyfile)"
        )
    local = devpi_status(config.devpi.port)
    now = time.time()
    seen = [
        f"{info.get('outside-url') or info.get('remote-ip')} at serial {info.get('serial')} "
        f"({_age(info.get('last-request'), now)})"
        for info in (local.get("polling_replicas") or {}).values()
    ]
    replicas = "; ".join(seen) if seen else "no replica polled since devpi started"
    return True, (
        f"role primary at serial {local.get('serial')}, port {port} refuses clients without "
        f"a replica certificate; {replicas}"
    )
