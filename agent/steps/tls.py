"""TLS before Caddy goes live: ports free, the domain pointing here (acme), certificates checked.

Runs before the caddy step, so a problem stops the run while the old configuration keeps serving:
- every mode: nothing but Caddy holds server.https_port / server.http_port;
- "acme": server.domain resolves to an address of this host (and, for the public CA, port 80
  or 443 is used), unless server.acme_preflight = false; Caddy would otherwise retry silently
  into the CA's rate limits. The acme_ca_root file is installed where Caddy can read it;
- "files": cert_file and key_file must match, cover server.domain and be in date; they are
  copied to /etc/caddy/tls (key 0640 root:caddy), and a changed copy reloads Caddy (Caddy
  does not watch certificate files).
- replication: a primary's CA and its replicas' client certificates made or kept
  (replica_pki.py), a replica's own certificate checked; Caddy gets its copies the same way.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from agent.core.context import Context, StepFailed
from agent.core.paths import CADDY_RELOAD, CADDYFILE
from agent.host import replication, tls
from agent.host.x509 import Address, Certificate

NAME = "tls"
EXPIRY_WARNING_DAYS = 14


def converge(ctx: Context) -> None:
    server = ctx.config.server
    ports = {server.https_port: "server.https_port"}
    if server.http_port:
        ports[server.http_port] = "server.http_port"
    if ctx.config.devpi.replication_port:
        ports[ctx.config.devpi.replication_port] = "devpi.replication_port"
    problems = tls.port_problems(tls.listeners(ports), ports)
    if server.tls == "acme" and server.acme_preflight:
        problems.extend(_acme_problems(ctx))
    if problems:
        raise StepFailed("\n".join(problems))

    wanted: dict[Path, bytes] = {}
    try:
        if server.tls == "acme" and server.acme_ca_root is not None:
            roots, checked = tls.read_pem_certificates("server.acme_ca_root", server.acme_ca_root)
            ctx.log.info("acme CA root", path=str(server.acme_ca_root), subject=roots[0].subject)
            wanted[tls.ACME_CA_ROOT_COPY] = checked
        if server.tls == "files":
            assert server.cert_file is not None and server.key_file is not None
            pair = tls.check_certificate_pair(server.cert_file, server.key_file, server.domain)
            wanted[tls.CERT_COPY] = pair.cert_pem
            wanted[tls.KEY_COPY] = pair.key_pem
            _log_certificate(ctx, pair.leaf)
    except tls.TlsProblem as problem:
        raise StepFailed(str(problem)) from None
    wanted.update(replication.converge_certificates(ctx))
    _install(ctx, wanted)


def _acme_problems(ctx: Context) -> list[str]:
    server = ctx.config.server
    problems = []
    if server.acme_ca is None:
        problem = tls.public_ports_problem(server.http_port, server.https_port)
        if problem:
            problems.append(problem)
    host = tls.host_addresses()
    resolved: tuple[Address, ...] | tls.ResolveFailed
    try:
        resolved = tls.resolve(server.domain)
    except tls.ResolveFailed as error:
        resolved = error
    problem = tls.domain_problem(server.domain, resolved, host, public_ca=server.acme_ca is None)
    if problem:
        problems.append(problem)
    else:
        shown = [str(a) for a in resolved] if isinstance(resolved, tuple) else []
        ctx.log.info("domain points here", domain=server.domain, addresses=shown)
    return problems


def _log_certificate(ctx: Context, leaf: Certificate) -> None:
    ctx.log.info(
        "certificate",
        subject=leaf.subject,
        issuer=leaf.issuer,
        names=list(leaf.names),
        not_after=leaf.not_after.isoformat(),
    )
    if leaf.days_left(datetime.now(timezone.utc)) < EXPIRY_WARNING_DAYS:
        ctx.log.warning("certificate expires soon", not_after=leaf.not_after.isoformat())


def _current(ctx: Context, path: Path) -> bytes | None:
    try:
        return ctx.files.host_path(path).read_bytes()
    except FileNotFoundError:
        return None


def _install(ctx: Context, wanted: dict[Path, bytes]) -> None:
    """Copies where Caddy reads them; a changed copy reloads Caddy; unused copies go."""
    if wanted:
        ctx.mkdir(tls.CADDY_TLS_DIR, mode=0o750, owner="root", group="caddy")
    changed = any(_current(ctx, path) != data for path, data in wanted.items())
    if changed and ctx.files.exists(CADDYFILE):
        # Marked before the writes: a run killed in between must still reload next time.
        ctx.mark_pending(CADDY_RELOAD)
    for path, data in wanted.items():
        private = path == tls.KEY_COPY or path in replication.PRIVATE_COPIES
        mode = 0o640 if private else 0o644
        ctx.write(path, data, mode=mode, owner="root", group="caddy", secret=private)
    live = ctx.files.read(CADDYFILE) or ""
    for path in (tls.CERT_COPY, tls.KEY_COPY, tls.ACME_CA_ROOT_COPY, *replication.CADDY_COPIES):
        # Only once the live Caddyfile no longer names it: a restart of Caddy must find it.
        if path not in wanted and str(path) not in live:
            ctx.files.remove(path)
