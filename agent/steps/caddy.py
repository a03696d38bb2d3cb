"""Caddy in front of devpi: HTTPS, basic auth with the devpi users' passwords, /+changelog closed.

A new Caddyfile is checked with `caddy validate` (as the caddy user, so no second CA appears under
/root) before it replaces the live one; the reload goes through Caddy's admin API. If the reload
fails, the previous file is put back and reloaded, and the step fails.

The admin API takes any config without a password, so by default it is a unix socket in a
directory only caddy (and root) may enter. `caddy reload` sends the new file to the admin address
that file names; when that address changes, the running Caddy still listens on the old one, so
Caddy is restarted instead.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

import bcrypt

from agent.core.config import DEFAULT_CADDY_ADMIN, admin_socket, is_ip_address
from agent.core.context import Context, StepFailed
from agent.core.crashpoint import crashpoint
from agent.core.files import render
from agent.core.netaddr import url_host
from agent.core.paths import (
    CADDY_RELOAD,
    CADDY_RESTART,
    CADDYFILE,
    STATE_DIR,
    SUPERVISOR_LOG_DIR,
)
from agent.facts.systemd import unit_state
from agent.host import replication, tls
from agent.host.caddy import (
    DISTRO_CADDY_VERSION,
    admin_address,
    basic_auth_directive,
    caddy_home,
    installed_version,
    metrics_option,
    reload,
    restart,
    validate,
    wait_for_https,
)
from agent.host.supervisor import ensure_program, ensure_running, program_state

NAME = "caddy"
HASH_MEMO = STATE_DIR / "basic-auth.memo"
MEMO_KEY = STATE_DIR / "basic-auth.memo-key"
MEMO_KEY_BYTES = 32
BCRYPT_ROUNDS = 12
_HASH_LINE = re.compile(r"^\s+(?P<user>\S+)\s+(?P<hash>\$2[aby]\$\d\d\$[./A-Za-z0-9]{53})\s*$")


@dataclass(frozen=True)
class BasicAuthUser:
    name: str
    hash: str


def existing_hashes(caddyfile: str | None) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for line in (caddyfile or "").splitlines():
        match = _HASH_LINE.match(line)
        if match:
            hashes[match["user"]] = match["hash"]
    return hashes


def _proof(key: bytes, name: str, bcrypt_hash: str, password: str) -> str:
    message = "\0".join((name, bcrypt_hash, password)).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


class HashMemo:
    """Which (hash, password) pairs bcrypt already confirmed, so a re-run skips the 0.3 s check.

    Stored as HMACs under a random key of its own (MEMO_KEY, root-only), never under anything
    the Caddyfile holds: group caddy reads the bcrypt hashes there, and a memo keyed by them
    would let anyone holding both test password guesses at SHA-256 speed instead of bcrypt's.
    Without the key (plan before the first apply) there is no memo and bcrypt decides.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.proofs: dict[str, str] = {}
        self.key = _memo_key(ctx)
        for line in (ctx.files.read(HASH_MEMO) or "").splitlines():
            name, _, proof = line.partition(" ")
            self.proofs[name] = proof

    def confirmed(self, name: str, bcrypt_hash: str, password: str) -> bool:
        if self.key is None:
            return False
        wanted = _proof(self.key, name, bcrypt_hash, password)
        return hmac.compare_digest(self.proofs.get(name, ""), wanted)

    def save(self, users: list[BasicAuthUser], passwords: dict[str, str]) -> None:
        if self.ctx.check or self.key is None:
            return
        key = self.key
        lines = "".join(
            f"{u.name} {_proof(key, u.name, u.hash, passwords[u.name])}\n" for u in users
        )
        self.ctx.files.ensure_file(HASH_MEMO, lines, mode=0o600, record=False)


def _memo_key(ctx: Context) -> bytes | None:
    """The memo's HMAC key, generated once (0600 root); None in check mode before it exists."""
    text = (ctx.files.read(MEMO_KEY) or "").strip()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        if ctx.check:
            return None
        # A missing or damaged key: a new one makes every old proof worthless, as it should.
        text = secrets.token_hex(MEMO_KEY_BYTES)
    if not ctx.check:
        ctx.files.ensure_dir(MEMO_KEY.parent, mode=0o700, record=False)
        ctx.files.ensure_file(MEMO_KEY, text + "\n", mode=0o600, secret=True, record=False)
    return bytes.fromhex(text)


def hash_for(
    name: str, password: str, previous: dict[str, str], memo: HashMemo | None = None
) -> str:
    """Keep the hash already in the file while it still matches: no churn on re-runs."""
    old = previous.get(name)
    if old and (
        (memo is not None and memo.confirmed(name, old, password))
        or bcrypt.checkpw(password.encode(), old.encode())
    ):
        return old
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=BCRYPT_ROUNDS)).decode()


def content(ctx: Context, version: tuple[int, int, int], current: str | None) -> str:
    server = ctx.config.server
    previous = existing_hashes(current)
    memo = HashMemo(ctx)
    users = [
        BasicAuthUser(u.name, hash_for(u.name, u.password, previous, memo))
        for u in ctx.config.users
    ]
    memo.save(users, {u.name: u.password for u in ctx.config.users})
    host = url_host(server.domain)
    return render(
        "Caddyfile.j2",
        admin=server.caddy_admin,
        # A client sends no SNI for an IP address; Caddy then needs to be told which
        # certificate is the site's, or it answers with a TLS alert behind NAT.
        default_sni=server.domain if is_ip_address(server.domain) else None,
        http_port=server.http_port,
        https_port=server.https_port,
        tls=server.tls,
        acme_email=server.acme_email,
        acme_ca=server.acme_ca,
        acme_ca_root=tls.ACME_CA_ROOT_COPY if server.acme_ca_root else None,
        cert_file=tls.CERT_COPY,
        key_file=tls.KEY_COPY,
        site=f"{host}:{server.https_port}",
        basic_auth_directive=basic_auth_directive(version),
        users=users,
        devpi_port=ctx.config.devpi.port,
        outside_url=server.outside_url,
        role=ctx.config.devpi.role,
        metrics=metrics_option(version) if ctx.config.metrics.enabled else None,
        replication_port=ctx.config.devpi.replication_port,
        replication_site=f"{host}:{ctx.config.devpi.replication_port}",
        replica_addresses=ctx.config.devpi.replica_addresses,
        replica_ca_file=replication.REPLICA_CA_COPY,
        replica_fingerprints=replication.replica_fingerprints(ctx),
        primary_host=replication.primary_host(ctx.config),
        primary_url=(
            replication.primary_upstream(ctx.config) if replication.is_replica(ctx.config) else None
        ),
        primary_proxy_port=ctx.config.devpi.primary_proxy_port,
        replica_client_cert=replication.CLIENT_CERT_COPY,
        replica_client_key=replication.CLIENT_KEY_COPY,
        primary_ca=(
            replication.PRIMARY_CA_COPY if ctx.config.devpi.primary_ca_file is not None else None
        ),
    )


def ensure_admin_socket_dir(ctx: Context) -> None:
    """The socket's directory: caddy's alone (0700), so no other user can connect to it."""
    address = ctx.config.server.caddy_admin
    socket_path = admin_socket(address)
    if socket_path is None:
        ctx.log.warning(
            "server.caddy_admin is a TCP port: every local user can reach it and replace "
            "Caddy's config (no password); the default unix socket is open to root and caddy "
            "only",
            caddy_admin=address,
            default=DEFAULT_CADDY_ADMIN,
        )
        return
    ctx.mkdir(
        socket_path.parent, mode=0o700, owner="caddy", group="caddy", key="server.caddy_admin"
    )


def ensure_started(ctx: Context) -> bool:
    """Start Caddy if nothing runs it; True if it was started (and so read the new file)."""
    if ctx.systemd:
        state = unit_state(ctx.runner, "caddy")
        if state.running_and_enabled:
            return False
        if ctx.change("enable and start caddy.service"):
            ctx.runner.run(["systemctl", "enable", "caddy"], timeout=60)
            if state.active != "active":
                ctx.runner.run(["systemctl", "start", "caddy"], timeout=120, check=False)
                return True
        return False
    program = render(
        "supervisor-caddy.conf.j2",
        caddyfile=CADDYFILE,
        home=caddy_home(),
        log_file=SUPERVISOR_LOG_DIR / "caddy.log",
    )
    started = ensure_program(ctx, "caddy", program)
    if program_state(ctx, "caddy") != "RUNNING":
        ensure_running(ctx, "caddy", restart=False)
        return not ctx.check
    return started


def converge(ctx: Context) -> None:
    installed = installed_version(ctx)
    if installed is None and not ctx.check:
        raise StepFailed("caddy is not installed or `caddy version` fails")
    version = installed or DISTRO_CADDY_VERSION
    current = ctx.files.read(CADDYFILE)
    wanted = content(ctx, version, current)
    ensure_admin_socket_dir(ctx)
    if wanted != current:
        if not ctx.check:
            validate(ctx, wanted)
        # Marked before the write: a run killed between the write and the reload must still
        # reload next time, or Caddy keeps serving the old file (old passwords included).
        ctx.mark_pending(CADDY_RELOAD)
        if admin_address(current) != admin_address(wanted):
            ctx.mark_pending(CADDY_RESTART)
    ctx.write(CADDYFILE, wanted, mode=0o640, owner="root", group="caddy")
    crashpoint("caddy:written")

    started = ensure_started(ctx)
    if ctx.check:
        return
    if (
        ctx.is_pending(CADDY_RESTART)
        and not started
        and ctx.change("restart caddy (its admin address changed)")
    ):
        restart(ctx)
        started = True
    ctx.clear_pending(CADDY_RESTART)
    if ctx.is_pending(CADDY_RELOAD) and not started and ctx.change("reload caddy"):
        result = reload(ctx)
        if not result.ok:
            _roll_back(ctx, current)
            raise StepFailed(
                f"caddy reload failed; the previous Caddyfile is back:\n{result.tail()}"
            )
    wait_for_https(ctx)
    ctx.clear_pending(CADDY_RELOAD)
    if replication.is_replica(ctx.config):
        # A replica's devpi reaches its primary through Caddy (the loopback site that presents
        # its certificate), so its first pull can only be waited for from here.
        replication.wait_for_first_sync(ctx)
        replication.report_replicated_users(ctx)


def _roll_back(ctx: Context, previous: str | None) -> None:
    if previous is None:
        return
    ctx.files.ensure_file(CADDYFILE, previous, mode=0o640, owner="root", group="caddy")
    reload(ctx)
