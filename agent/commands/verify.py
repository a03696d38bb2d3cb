"""`devpi-agent verify`: is this host a healthy, locked-down private index right now?

Every check looks from where a user or an attacker would: through Caddy on the HTTPS port (with
and without credentials), at devpi on loopback, at the processes, sockets and files. Nothing is
changed. Each check ends ok or failed with a detail a person can act on; any failure exits 1.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import ssl
import stat
import tempfile
import time
import urllib.error
from base64 import b64encode
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import click

from agent.commands.support import (
    EXIT_FAILED,
    EXIT_OK,
    config_option,
    host_context,
    load_config,
    require_root,
)
from agent.core import direct_http, log
from agent.core.config import Config, metrics_address
from agent.core.context import Context, StepFailed
from agent.core.log import redactor
from agent.core.paths import DEVPI_PROGRAM, METRICS_PROGRAM, SYSTEM_CA_BUNDLE
from agent.core.status import read_status
from agent.facts.systemd import is_active
from agent.host import replication, tls
from agent.host.caddy import caddy_home
from agent.host.devpi_api import DevpiApi
from agent.host.devpi_server import root_password
from agent.host.supervisor import devpi_api_answers, program_state, supervisord_answers

GIB = 1024**3
# Below either, devpi risks failing uploads and the mirror cache; both are cheap to fix early.
MIN_FREE_BYTES = 1 * GIB
MIN_FREE_FRACTION = 0.05
# Caddy renews a certificate when a third of its life is left: 30 days for a 90-day ACME one,
# about 4 h for a 12-hour `tls internal` one. Less than these left means renewal is failing.
MIN_CERT_LEFT_SECONDS = {"internal": 3600.0, "acme": 7 * 86400.0, "files": 7 * 86400.0}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def passed(name: str, detail: str) -> Check:
    return Check(name, True, detail)


def failed(name: str, detail: str) -> Check:
    return Check(name, False, detail)


# --- talking to Caddy as a client would -------------------------------------------------------


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to this host's loopback, with the SNI and Host of the public name: what a client
    reaching `domain` sees, even where the name resolves elsewhere from here (NAT, split DNS)."""

    def __init__(self, domain: str, port: int, timeout: float) -> None:
        context = ssl.create_default_context()
        # Trust is the certificate check's business; these checks look at what Caddy answers.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        super().__init__(domain, port, timeout=timeout, context=context)
        self._tls_context = context
        self._server_name = domain

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._tls_context.wrap_socket(sock, server_hostname=self._server_name)


def through_caddy(
    config: Config, path: str, auth: tuple[str, str] | None = None, timeout: float = 30
) -> int:
    """The HTTP status Caddy answers for GET `path` (with Basic credentials when given)."""
    server = config.server
    connection = _PinnedHTTPSConnection(server.domain, server.https_port, timeout)
    headers = {"Accept": "application/json", "User-Agent": "devpi-agent-verify"}
    if auth is not None:
        token = b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


# --- the checks -------------------------------------------------------------------------------


def supervisor_verdict(state: str | None, answers: bool) -> Check:
    """supervisord's state of devpi-server. STARTING lasts startsecs (5 s) after a start, while
    devpi itself answers within about a second, so a verify right after an apply sees it:
    STARTING and answering is a devpi that has come up."""
    if state == "RUNNING":
        return passed("supervisor", f"supervisord runs program {DEVPI_PROGRAM} (RUNNING)")
    if state == "STARTING" and answers:
        return passed(
            "supervisor",
            f"supervisord runs program {DEVPI_PROGRAM} (STARTING: just started, and answering)",
        )
    return failed("supervisor", f"supervisord runs, but program {DEVPI_PROGRAM} is {state}")


def check_supervisor(ctx: Context) -> Check:
    if not supervisord_answers(ctx):
        return failed("supervisor", "supervisord does not answer on its socket")
    state = program_state(ctx, DEVPI_PROGRAM)
    answers = state == "STARTING" and devpi_api_answers(ctx.config.devpi.port)
    return supervisor_verdict(state, answers)


def check_devpi(ctx: Context) -> Check:
    port = ctx.config.devpi.port
    if devpi_api_answers(port):
        return passed("devpi-server", f"http://127.0.0.1:{port}/+api answers")
    return failed("devpi-server", f"http://127.0.0.1:{port}/+api does not answer")


def check_caddy(ctx: Context) -> Check:
    if ctx.systemd:
        state = is_active(ctx.runner, "caddy")
        running = state == "active"
        described = f"caddy.service is {state or 'unknown'}"
    else:
        state = program_state(ctx, "caddy") or "not known to supervisord"
        running = state == "RUNNING"
        described = f"supervisor program caddy is {state}"
    if running:
        return passed("caddy", described)
    return failed("caddy", described)


def check_proxy_api(ctx: Context) -> Check:
    user = ctx.config.users[0]
    url = f"{ctx.config.server.outside_url}/+api"
    status = through_caddy(ctx.config, "/+api", (user.name, user.password))
    if status == 200:
        return passed("proxy-api", f"{url} answers 200 for user {user.name}")
    return failed("proxy-api", f"{url} answers {status} for user {user.name} (expected 200)")


def check_basic_auth(ctx: Context) -> Check:
    user = ctx.config.users[0]
    anonymous = through_caddy(ctx.config, "/+api")
    wrong = through_caddy(ctx.config, "/+api", (user.name, "wrong-" + secrets.token_hex(8)))
    detail = f"without credentials {anonymous}, with a wrong password {wrong}"
    if anonymous == 401 and wrong == 401:
        return passed("basic-auth", detail)
    return failed("basic-auth", detail + " (both must be 401)")


def certificate_verdict(
    info: tls.CertInfo, tls_mode: str, now: datetime | None = None
) -> tuple[bool, str]:
    now = now or datetime.now(timezone.utc)
    left = (info.not_after - now).total_seconds()
    when = f"{info.not_after:%Y-%m-%d %H:%M} UTC"
    if left <= 0:
        return False, f"expired on {when} (issued by {info.issuer})"
    remaining = f"{left / 86400:.1f} days" if left >= 86400 else f"{left / 3600:.1f} h"
    described = (
        f"issued by {info.issuer} for {', '.join(info.names) or info.subject}, "
        f"expires {when} (in {remaining})"
    )
    if not info.chain_ok:
        return False, f"not trusted: {info.verify_error}; {described}"
    if left < MIN_CERT_LEFT_SECONDS.get(tls_mode, 7 * 86400.0):
        return False, f"renewal is overdue: {described}"
    return True, described


def trusted_roots(config: Config) -> list[Path]:
    """CA files a client of this server trusts besides the system store.

    acme_ca_root is the ACME server's own TLS root, which for a company CA (step-ca) is also its
    issuing root; with tls = "files", the chain in cert_file may end in the company's root.
    """
    server = config.server
    if server.tls == "internal":
        return [tls.internal_root(caddy_home())]
    if server.tls == "acme" and server.acme_ca_root is not None:
        return [server.acme_ca_root]
    if server.tls == "files" and server.cert_file is not None:
        return [server.cert_file]
    return []


def _bundle(extra: list[Path]) -> str | None:
    """One PEM file: the system store plus `extra`, for ssl's single cafile."""
    if not extra:
        return None
    parts = [SYSTEM_CA_BUNDLE.read_text()] if SYSTEM_CA_BUNDLE.exists() else []
    parts += [path.read_text() for path in extra]
    fd, name = tempfile.mkstemp(prefix="devpi-agent-verify-", suffix=".pem")
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(parts))
    return name


def check_certificate(ctx: Context) -> Check:
    server = ctx.config.server
    extra = trusted_roots(ctx.config)
    missing = [str(path) for path in extra if not path.exists()]
    if missing:
        return failed("tls-certificate", f"the CA to trust, {', '.join(missing)}, does not exist")
    cafile = _bundle(extra)
    try:
        info = tls.served_certificate("127.0.0.1", server.https_port, server.domain, cafile=cafile)
    finally:
        if cafile is not None:
            os.unlink(cafile)
    ok, detail = certificate_verdict(info, server.tls)
    return Check("tls-certificate", ok, detail)


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def loopback_verdict(addresses: Sequence[str], port: int) -> Check:
    if not addresses:
        return failed("devpi-loopback", f"nothing listens on port {port}")
    exposed = sorted({a for a in addresses if not _is_loopback(a)})
    shown = ", ".join(sorted(set(addresses)))
    if exposed:
        return failed(
            "devpi-loopback", f"port {port} listens on {shown}: {', '.join(exposed)} is reachable"
        )
    return passed("devpi-loopback", f"port {port} listens on {shown} only")


def check_loopback(ctx: Context) -> Check:
    port = ctx.config.devpi.port
    return loopback_verdict([listener.address for listener in tls.listeners([port])], port)


def check_root_password(ctx: Context) -> Check:
    if replication.is_replica(ctx.config):
        # A replica relays logins to its primary: root and its password are the primary's.
        return passed("root-password", "replica: root is the primary's, checked there")
    api = DevpiApi(ctx.config.devpi.port, timeout=30)
    if not devpi_api_answers(ctx.config.devpi.port):
        return failed("root-password", "cannot check: devpi does not answer")
    if api.password_matches("root", ""):
        return failed(
            "root-password",
            "devpi's root logs in with an EMPTY password: anyone reaching devpi is its admin",
        )
    configured = root_password(ctx)
    if configured is not None and not api.password_matches("root", configured):
        return failed(
            "root-password",
            f"root does not log in with {ctx.config.devpi.root_password_file}: apply cannot "
            "manage users",
        )
    return passed("root-password", "an empty password is refused; the configured one works")


def file_verdict(name: str, path: Path, st: os.stat_result | None, owner: str) -> Check:
    if st is None:
        return failed(name, f"{path} does not exist")
    mode = stat.S_IMODE(st.st_mode)
    try:
        holder = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        holder = str(st.st_uid)
    if mode != 0o600 or holder != owner:
        return failed(name, f"{path} is {mode:04o} {holder}, must be 0600 {owner}")
    return passed(name, f"{path} is 0600 {owner}")


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def check_secret_file(ctx: Context) -> Check:
    devpi = ctx.config.devpi
    path = ctx.files.host_path(devpi.secretfile)
    return file_verdict("secret-file", devpi.secretfile, _stat(path), devpi.user)


def check_private_files(ctx: Context) -> Check:
    """The config, the root password and every password file: root's alone."""
    config = ctx.config
    paths = [config.devpi.root_password_file]
    if config.path is not None:
        paths.append(config.path)
    paths += [u.password_file for u in config.users if u.password_file is not None]
    if config.devpi.secret_file is not None:
        paths.append(config.devpi.secret_file)
    problems = []
    for path in paths:
        st = _stat(ctx.files.host_path(path))
        if st is not None and (stat.S_IMODE(st.st_mode) & 0o077 or st.st_uid != 0):
            problems.append(f"{path} is {stat.S_IMODE(st.st_mode):04o} uid {st.st_uid}")
    if problems:
        return failed("private-files", "; ".join(problems) + " (must be root's, 0600)")
    return passed("private-files", f"{len(paths)} files holding passwords are root's alone")


def process_uid(pid: int, proc: Path = Path("/proc")) -> int:
    for line in (proc / str(pid) / "status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise ValueError(f"no Uid in /proc/{pid}/status")


def check_devpi_user(ctx: Context) -> Check:
    devpi = ctx.config.devpi
    holders = [item for item in tls.listeners([devpi.port]) if item.pid is not None]
    if not holders:
        return failed("devpi-user", f"no process found listening on port {devpi.port}")
    wanted = pwd.getpwnam(devpi.user).pw_uid
    details = []
    ok = True
    for pid in sorted({item.pid for item in holders if item.pid is not None}):
        uid = process_uid(pid)
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        details.append(f"pid {pid} runs as {name}")
        ok = ok and uid == wanted and uid != 0
    detail = ", ".join(details)
    return Check("devpi-user", ok, detail if ok else f"{detail}, must be {devpi.user}")


def check_changelog(ctx: Context) -> Check:
    user = ctx.config.users[0]
    status = through_caddy(ctx.config, "/+changelog/0", (user.name, user.password))
    if 200 <= status < 400:
        return failed(
            "changelog-closed",
            f"/+changelog answers {status} through Caddy: it replicates everything, password "
            "hashes included",
        )
    return passed("changelog-closed", f"/+changelog answers {status} through Caddy")


def disk_verdict(path: Path, total: int, free: int) -> Check:
    fraction = free / total if total else 0.0
    detail = f"{free / GIB:.1f} GiB free of {total / GIB:.1f} GiB ({fraction:.0%}) under {path}"
    if free < MIN_FREE_BYTES or fraction < MIN_FREE_FRACTION:
        return failed("disk-space", detail)
    return passed("disk-space", detail)


def check_disk(ctx: Context) -> Check:
    serverdir = ctx.config.devpi.serverdir
    real = ctx.files.host_path(serverdir)
    target = real if real.exists() else real.parent
    usage = shutil.disk_usage(target)
    return disk_verdict(serverdir, usage.total, usage.free)


# How long a schedule may go between two backups, in seconds.
SCHEDULE_INTERVALS = {"hourly": 3600.0, "daily": 86400.0, "weekly": 7 * 86400.0}
SCHEDULE_INTERVALS["monthly"] = 31 * 86400.0
# On top of the interval: the timer's RandomizedDelaySec (10 min) and the backup's own run,
# a quarter of the interval, at least an hour.
MIN_BACKUP_MARGIN = 3600.0


def schedule_interval(ctx: Context) -> float:
    """The longest gap between two scheduled backups: the shorthands' and HH:MM's (a day) are
    known; any other OnCalendar value is asked of systemd (its next two elapses); a day if
    systemd cannot say."""
    schedule = ctx.config.backup.schedule
    if schedule in SCHEDULE_INTERVALS:
        return SCHEDULE_INTERVALS[schedule]
    if re.fullmatch(r"(\*-\*-\* )?\d{1,2}:\d{2}(:00)?", schedule):
        return 86400.0
    found = ctx.runner.run(
        ["systemd-analyze", "calendar", "--iterations=2", schedule],
        env={"TZ": "UTC"},
        check=False,
        timeout=30,
    )
    stamps = re.findall(r"(?:Next elapse|Iter\. #2): \w+ (\S+ \S+) UTC", found.stdout)
    if found.ok and len(stamps) == 2:
        first, second = (datetime.fromisoformat(s).timestamp() for s in stamps)
        return max(second - first, 60.0)
    return 86400.0


def allowed_age(interval: float) -> float:
    return interval + max(MIN_BACKUP_MARGIN, interval / 4)


def remote_backup_verdict(
    record: dict[str, object] | None, now: float, allowed: float, remote: str
) -> Check:
    """The last push to the remote: there, recent enough, and not failed."""
    name = "remote-backup"
    if record is None:
        return failed(name, f"no backup has gone to {remote} yet (run devpi-agent backup)")
    finished = record.get("finished")
    age = now - float(finished) if isinstance(finished, (int, float)) else float("inf")
    hours = f"{age / 3600:.1f} h ago" if age != float("inf") else "at an unknown time"
    if not record.get("ok"):
        error = str(record.get("error") or "unknown error").splitlines()[0]
        return failed(name, f"the last push to {remote} failed {hours}: {error}")
    detail = (
        f"snapshot {record.get('snapshot')} in {remote}, {hours} "
        f"(at most {allowed / 3600:.1f} h allowed by backup.schedule)"
    )
    return passed(name, detail) if age <= allowed else failed(name, f"too old: {detail}")


def check_remote_backup(ctx: Context) -> Check:
    """The age of the last good push from remote-backup.json; a failed one fails."""
    allowed = allowed_age(schedule_interval(ctx))
    record = read_status(ctx.files, "remote-backup")
    return remote_backup_verdict(record, time.time(), allowed, str(ctx.config.backup.remote))


CHECKS: tuple[tuple[str, Callable[[Context], Check]], ...] = (
    ("supervisor", check_supervisor),
    ("devpi-server", check_devpi),
    ("caddy", check_caddy),
    ("proxy-api", check_proxy_api),
    ("basic-auth", check_basic_auth),
    ("tls-certificate", check_certificate),
    ("devpi-loopback", check_loopback),
    ("root-password", check_root_password),
    ("secret-file", check_secret_file),
    ("private-files", check_private_files),
    ("devpi-user", check_devpi_user),
    ("changelog-closed", check_changelog),
    ("disk-space", check_disk),
)


def check_replication(ctx: Context) -> Check:
    """A replica: its lag behind the primary; a primary: protocol on, port guarded, replicas."""
    if replication.is_replica(ctx.config):
        ok, detail = replication.replica_verdict(ctx.config)
    else:
        ok, detail = replication.primary_verdict(ctx)
    return Check("replication", ok, detail)


def metrics_verdict(state: str | None, answers: bool, listen: str) -> Check:
    if state != "RUNNING":
        return failed("metrics", f"{METRICS_PROGRAM} is {state or 'not installed'}")
    if not answers:
        return failed(
            "metrics", f"{METRICS_PROGRAM} runs but http://{listen}/metrics does not answer"
        )
    return passed("metrics", f"exporter answers on http://{listen}/metrics")


def exporter_answers(listen: str, timeout: float = 10) -> bool:
    host, port = metrics_address(listen)
    url_host = f"[{host}]" if ":" in host else host
    try:
        with direct_http.urlopen(f"http://{url_host}:{port}/metrics", timeout=timeout) as answer:
            return bool(answer.status == 200 and b"devpi_up " in answer.read())
    except (urllib.error.URLError, OSError):
        return False


def check_metrics(ctx: Context) -> Check:
    """metrics.enabled: the exporter runs under supervisor and answers on metrics.listen."""
    listen = ctx.config.metrics.listen
    return metrics_verdict(program_state(ctx, METRICS_PROGRAM), exporter_answers(listen), listen)


def checks_for(config: Config) -> tuple[tuple[str, Callable[[Context], Check]], ...]:
    checks = CHECKS
    if config.devpi.role != "standalone":
        checks = (*checks, ("replication", check_replication))
    if config.metrics.enabled:
        checks = (*checks, ("metrics", check_metrics))
    # Without a schedule (backup.enabled = false) there is no age to hold the last push to.
    if config.backup.remote and config.backup.enabled:
        checks = (*checks, ("remote-backup", check_remote_backup))
    return checks


def run_checks(
    ctx: Context, checks: Sequence[tuple[str, Callable[[Context], Check]]] = CHECKS
) -> list[Check]:
    """Every check, each on its own: one that cannot even look is failed, with the reason."""
    results = []
    for name, check in checks:
        try:
            result = check(ctx)
        except (OSError, ValueError, KeyError, http.client.HTTPException, StepFailed) as error:
            reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
            result = failed(name, f"could not check: {reason}")
        results.append(Check(result.name, result.ok, redactor(result.detail)))
    return results


def render_table(checks: Sequence[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  {'status':<6}  detail"]
    lines += [f"{c.name:<{width}}  {'ok' if c.ok else 'FAILED':<6}  {c.detail}" for c in checks]
    bad = sum(1 for c in checks if not c.ok)
    lines.append(f"verify: {len(checks) - bad} ok, {bad} failed")
    return "\n".join(lines)


def as_json(checks: Sequence[Check]) -> str:
    return json.dumps(
        {"ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]}, indent=None
    )


@click.command("verify")
@config_option
@click.option("--json", "as_json_output", is_flag=True, help="Print one JSON document.")
def verify(config_path: Path, as_json_output: bool) -> None:
    """Check this host's health and security; exit 1 if anything is wrong."""
    config = load_config("verify", config_path)
    require_root("verify")
    log.configure(log_file=None)
    ctx = host_context(config, check=True)
    checks = run_checks(ctx, checks_for(config))
    click.echo(as_json(checks) if as_json_output else render_table(checks))
    raise SystemExit(EXIT_OK if all(c.ok for c in checks) else EXIT_FAILED)
