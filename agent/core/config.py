"""The agent's configuration: parsed once from TOML into frozen dataclasses, validated up front.

Nothing on the host is touched while parsing; every problem raises ConfigError naming the key.
"""

from __future__ import annotations

import ipaddress
import os.path
import re
import sys
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from agent.core.devpilock import LockError, parse_lock, shipped_lock, versions_of
from agent.core.reading import read_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - CPython 3.10 has no tomllib; tomli is the same parser
    import tomli as tomllib

from agent.core.netaddr import url_host

DEFAULT_CONFIG_PATH = Path("/etc/devpi-agent/config.toml")
BCRYPT_MAX_PASSWORD_BYTES = 72

TlsMode = Literal["acme", "internal", "files"]
CaddySource = Literal["distro", "official"]
Indexer = Literal["null", "whoosh"]
UpgradeMode = Literal["auto", "export-import"]
Role = Literal["standalone", "primary", "replica"]
KeyDerivation = Literal["rfc9106-low-memory", "devpi"]
# What each accepts, in the order error messages list them: the Literal types are the only list.
TLS_MODES: tuple[TlsMode, ...] = get_args(TlsMode)
CADDY_SOURCES: tuple[CaddySource, ...] = get_args(CaddySource)
INDEXERS: tuple[Indexer, ...] = get_args(Indexer)
UPGRADE_MODES: tuple[UpgradeMode, ...] = get_args(UpgradeMode)
ROLES: tuple[Role, ...] = get_args(Role)
KEY_DERIVATIONS: tuple[KeyDerivation, ...] = get_args(KeyDerivation)


@dataclass(frozen=True)
class Argon2Cost:
    """argon2id's cost, as devpi-server's --argon2-* options take it."""

    memory_kib: int
    time_cost: int
    parallelism: int


# devpi-server derives its login-token and replication keys from its secret with argon2id, at
# every start. devpi's own cost (512 MiB, 16 passes, 8 lanes) took 4 s and a 512 MiB spike on
# the recipe's 2-core, 2 GB box. The secret is random (devpi-gen-secret, or a file at least
# devpi's minimum), not a password, so RFC 9106's second recommended option, meant for
# memory-constrained machines, is the default.
KEY_DERIVATION_COSTS: dict[KeyDerivation, Argon2Cost | None] = {
    "rfc9106-low-memory": Argon2Cost(memory_kib=64 * 1024, time_cost=3, parallelism=4),
    "devpi": None,  # devpi-server's own defaults, no options passed
}

_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_DEVPI_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^[0-9]+(\.[0-9]+)*([a-z]+[0-9]*)?(\.post[0-9]+)?(\.dev[0-9]+)?$")
# What a real address holds, and nothing Caddy would read as a placeholder ({$VAR}) or a quote.
_EMAIL = re.compile(
    r"[A-Za-z0-9._%+-]{1,64}@(?:(?!-)[A-Za-z0-9-]{1,63}(?<!-)\.)+[A-Za-z][A-Za-z0-9-]{0,62}"
)
# Every path goes into systemd units, supervisor's INI, YAML and the cron line: only what real
# paths use, none of those formats' quotes, comments, specifiers or placeholders (%, $, {}).
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._/+@-]*")
# RFC 3986's characters, without the quote, $ and braces a Caddyfile or YAML would act on.
_URL_CHARS = re.compile(r"[A-Za-z0-9._~:/?#\[\]@!&()*+,;=%-]+")
# Caddy's admin API takes any config from whoever reaches it, without a password. A unix socket
# in a directory only caddy (and root) may enter keeps every other local user out; Caddy 2.6
# unlinks a stale socket itself when it starts. Not under /run: it must be there after a reboot
# with or without systemd, and the parent is root's so caddy cannot swap the directory.
DEFAULT_CADDY_ADMIN = "unix//var/lib/caddy-admin/admin.sock"
_UNIX_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with its NUL
# Directories a configured directory (devpi.home, devpi.venv, backup.dir, the admin socket's)
# must never be: the agent sets the mode and owner of those, which would break the host.
SYSTEM_DIRECTORIES = frozenset(
    {
        "/", "/bin", "/boot", "/dev", "/etc", "/etc/caddy", "/etc/ssl", "/etc/ssl/private",
        "/etc/systemd", "/home", "/lib", "/lib64", "/media", "/mnt", "/opt", "/proc", "/root",
        "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/usr/bin", "/usr/lib", "/usr/local",
        "/usr/local/bin", "/usr/local/lib", "/usr/local/sbin", "/usr/sbin", "/usr/share",
        "/var", "/var/backups", "/var/cache", "/var/lib", "/var/lib/caddy", "/var/local",
        "/var/lock", "/var/log", "/var/mail", "/var/opt", "/var/run", "/var/spool", "/var/tmp",
        "/var/www",
    }
)  # fmt: skip
_HOST_PORT = re.compile(r"^(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\]):(?P<port>[0-9]{1,5})$")


class ConfigError(Exception):
    """An invalid configuration; `key` is the dotted path of the offending setting."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


@dataclass(frozen=True)
class ServerConfig:
    domain: str
    https_port: int = 443
    http_port: int = 80
    tls: TlsMode = "acme"
    acme_email: str | None = None
    caddy_admin: str = DEFAULT_CADDY_ADMIN  # unix//path, or host:port on loopback
    acme_ca: str | None = None  # ACME directory URL; None: Caddy's default (Let's Encrypt)
    acme_ca_root: Path | None = None  # PEM root that signs the acme_ca server's certificate
    acme_preflight: bool = True
    cert_file: Path | None = None  # tls = "files"
    key_file: Path | None = None

    @property
    def outside_url(self) -> str:
        """The https URL clients use, as devpi must write it into links."""
        host = url_host(self.domain)
        port = "" if self.https_port == 443 else f":{self.https_port}"
        return f"https://{host}{port}"


@dataclass(frozen=True)
class DevpiConfig:
    port: int = 4040
    user: str = "devpi"
    home: Path = Path("/var/lib/devpi")
    venv: Path = Path("/opt/devpi-agent/venv")
    root_password_file: Path = Path("/etc/devpi-agent/root.pass")
    # What the agent installs unless the config pins other versions.
    server_version: str = "6.20.3"
    web_version: str = "5.1.1"
    client_version: str = "7.3.0"
    # The lock the venv is built from (every package, sha256-pinned): None is the one shipped in
    # the agent (units/devpi.lock); a path is the user's own, for versions the shipped one lacks.
    lock_file: Path | None = None
    lock: str | None = field(default=None, repr=False)
    # True: pip resolves devpi's dependencies at apply time, unpinned (a warning in every run).
    unlocked: bool = False
    # devpi-web's search. Whoosh stays small because the mirror's ~930k names are never listed.
    indexer: Indexer = "whoosh"
    # False: root/pypi asks PyPI per project and never downloads its list of every project name
    # (11-14 s and ~350 MB after each start, and what Whoosh would index). True lists PyPI's
    # projects in devpi-web and search, at that cost.
    mirror_project_list: bool = False
    # The argon2id cost of devpi's key derivation (KEY_DERIVATION_COSTS). A primary and its
    # replicas must use the same, or replication fails to authenticate.
    key_derivation: KeyDerivation = "rfc9106-low-memory"
    # True: users and indexes missing from the config are deleted from devpi (never root's).
    prune: bool = False
    # "auto": in place within a devpi-server major version, export and import across majors;
    # "export-import": every devpi-server version change goes through export and import.
    upgrade: UpgradeMode = "auto"
    # Replication (docs/scaling.md): "primary" serves devpi's replication protocol through
    # Caddy's replication site on replication_port, to replica_addresses only; "replica" is a
    # read copy of primary_url. Both share devpi's signing secret, read from secret_file.
    role: Role = "standalone"
    replication_port: int | None = None
    replica_addresses: tuple[str, ...] = ()
    # A primary issues a client certificate to each replica named here (replica_pki.py); only
    # those certificates get through its replication site.
    replicas: tuple[str, ...] = ()
    primary_url: str | None = None
    primary_ca_file: Path | None = None
    # A replica: the certificate and key its primary issued it (/etc/devpi-agent/replicas/
    # <name>.pem there), which its Caddy presents on a loopback site devpi reaches the primary by.
    replica_cert_file: Path | None = None
    replica_cert: bytes | None = field(default=None, repr=False)
    primary_proxy_port: int = 3142
    secret_file: Path | None = None
    secret: bytes | None = field(default=None, repr=False)

    @property
    def serverdir(self) -> Path:
        return self.home / "server"

    @property
    def secretfile(self) -> Path:
        return self.home / "secret"

    @property
    def argon2_cost(self) -> Argon2Cost | None:
        """None: devpi-server's own defaults."""
        return KEY_DERIVATION_COSTS[self.key_derivation]

    @property
    def requirements(self) -> tuple[str, ...]:
        return (
            f"devpi-server=={self.server_version}",
            f"devpi-web=={self.web_version}",
            f"devpi-client=={self.client_version}",
        )


@dataclass(frozen=True)
class AptConfig:
    upgrade: bool = False
    lock_timeout: int = 600


@dataclass(frozen=True)
class CaddyConfig:
    source: CaddySource = "distro"


@dataclass(frozen=True)
class BackupConfig:
    enabled: bool = True
    dir: Path = Path("/var/backups/devpi")
    # A systemd OnCalendar value; cron hosts accept hourly, daily, weekly, monthly and HH:MM.
    schedule: str = "daily"
    keep: int = 7
    # Off-host copies with restic: "sftp:user@host:/path", "s3:...", "rest:..."; None is none.
    remote: str | None = None
    remote_password_file: Path | None = None  # the restic repository's password, root-only
    remote_env_file: Path | None = None  # KEY=VALUE lines for restic (AWS keys...), root-only
    remote_env: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # read from it
    remote_keep: int = 14  # restic forget --keep-last
    remote_ssh_key_file: Path | None = None  # sftp only
    remote_known_hosts_file: Path | None = None  # sftp only


@dataclass(frozen=True)
class MetricsConfig:
    # True: `devpi-agent metrics serve` runs under supervisor and answers on `listen`; False:
    # nothing runs and nothing listens.
    enabled: bool = False
    # host:port of the exporter; an IP address (loopback unless a firewall keeps it private).
    listen: str = "127.0.0.1:9449"
    # Seconds after the last good backup at which the rules call it too old (a daily schedule
    # and two hours' grace).
    backup_max_age: int = 93600
    # Seconds between walks of devpi's +files (the walk is cached; it reads every directory).
    files_scan_interval: int = 300


@dataclass(frozen=True)
class User:
    name: str
    password: str = field(repr=False)
    password_file: Path | None = None


@dataclass(frozen=True)
class Index:
    user: str
    index: str
    bases: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.user}/{self.index}"


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    devpi: DevpiConfig = DevpiConfig()
    apt: AptConfig = AptConfig()
    caddy: CaddyConfig = CaddyConfig()
    backup: BackupConfig = BackupConfig()
    metrics: MetricsConfig = MetricsConfig()
    users: tuple[User, ...] = ()
    indexes: tuple[Index, ...] = ()
    path: Path | None = None

    def secrets(self) -> list[str]:
        """Every password the config holds, for log redaction."""
        return [user.password for user in self.users] + [v for _, v in self.backup.remote_env]


T = TypeVar("T")
C = TypeVar("C", bound=str)


class _Table:
    """A TOML table being consumed: every key read is ticked off, leftovers are unknown keys.

    A key left out takes the default of the same-named field of the dataclass `of`, the one
    place each default is written."""

    def __init__(self, data: Mapping[str, Any], key: str, of: type[Any] | None = None) -> None:
        self.data = data
        self.key = key
        self.seen: set[str] = set()
        self.defaults: dict[str, Any] = {
            f.name: f.default for f in (fields(of) if of else ()) if f.default is not MISSING
        }

    def path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def default(self, name: str) -> Any:
        return self.defaults[name]

    def get(self, name: str, kind: type[T] | tuple[type, ...], absent: Any = ...) -> Any:
        """The value of `name`; left out, `absent` if given, else the field's default."""
        self.seen.add(name)
        if name not in self.data:
            if absent is ...:
                absent = self.defaults.get(name, ...)
            if absent is ...:
                raise ConfigError(self.path(name), "required setting is missing")
            return absent
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; TOML keeps them apart, so do we.
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(self.path(name), f"expected {_kind_name(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise ConfigError(
                self.path(name), f"expected {_kind_name(kinds)}, got {_describe(value)}"
            )
        return value

    def table(self, name: str, of: type[Any]) -> _Table:
        return _Table(self.get(name, dict, {}), self.path(name), of)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(self.path(unknown[0]), "unknown setting")


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _port(table: _Table, name: str, *, allow_zero: bool = False) -> int:
    value: int = table.get(name, int)
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ConfigError(table.path(name), f"port {value} is outside {low}-65535")
    return value


def _choice(table: _Table, name: str, choices: tuple[C, ...]) -> C:
    value: str = table.get(name, str)
    for choice in choices:
        if value == choice:
            return choice
    wanted = ", ".join(f'"{c}"' for c in choices)
    raise ConfigError(table.path(name), f"{value!r} is not one of {wanted}")


def _absolute_path(table: _Table, name: str) -> Path:
    return checked_path(table.path(name), str(table.get(name, str)))


def checked_path(key: str, value: str) -> Path:
    """An absolute path made only of the characters every file the agent writes can hold."""
    if not value.startswith("/"):
        raise ConfigError(key, f"{value!r} is not an absolute path")
    if not _SAFE_PATH.fullmatch(value):
        raise ConfigError(
            key,
            f"{value!r} holds a character other than letters, digits and . _ / + @ - "
            "(no spaces, quotes, %, $ or braces)",
        )
    return Path(value)


def _own_directory(table: _Table, name: str) -> Path:
    path = _absolute_path(table, name)
    check_own_directory(table.path(name), path)
    return path


def _version(table: _Table, name: str) -> str:
    value: str = table.get(name, str)
    if not _VERSION.fullmatch(value):
        raise ConfigError(
            table.path(name), f"{value!r} is not a release version like {table.default(name)}"
        )
    return value


def is_ip_address(name: str) -> bool:
    # An IPv6 zone ID (fe80::1%eth0) may hold almost anything after the %; no server needs one.
    if "%" in name:
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _check_domain(key: str, domain: str) -> None:
    if is_ip_address(domain):
        return
    # No trailing dot: Caddy refuses "pypi.example.com." and ".." as a certificate subject.
    labels = domain.split(".")
    if len(domain) > 253 or not all(_HOSTNAME_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(key, f"{domain!r} is neither a DNS name nor an IP address")


def _parse_server(table: _Table) -> ServerConfig:
    domain: str = table.get("domain", str)
    _check_domain(table.path("domain"), domain)
    https_port = _port(table, "https_port")
    http_port = _port(table, "http_port", allow_zero=True)
    if http_port == https_port:
        raise ConfigError(table.path("http_port"), "must differ from server.https_port")
    tls = _choice(table, "tls", TLS_MODES)
    email: str | None = table.get("acme_email", str)
    if email is not None and not _EMAIL.fullmatch(email):
        raise ConfigError(table.path("acme_email"), f"{email!r} is not an e-mail address")
    if tls == "acme" and is_ip_address(domain):
        raise ConfigError(
            table.path("tls"),
            f'"acme" needs a DNS name, not the IP address {domain}; use tls = "internal"',
        )
    admin = _caddy_admin(table)
    tls_settings = _parse_tls_settings(table, tls)
    table.finish()
    return ServerConfig(
        domain=domain,
        https_port=https_port,
        http_port=http_port,
        tls=tls,
        acme_email=email,
        caddy_admin=admin,
        **tls_settings,
    )


def admin_socket(address: str) -> Path | None:
    """The socket of a `unix//path` admin address; None for host:port."""
    return Path(address[len("unix/") :]) if address.startswith("unix/") else None


def check_own_directory(key: str, path: Path) -> None:
    """A directory the agent will own (mode, owner) must not be one the system relies on."""
    normal = os.path.normpath(str(path))
    if normal in SYSTEM_DIRECTORIES:
        raise ConfigError(
            key,
            f"{normal} is a system directory; the agent would set its mode and owner: "
            f"give it a directory of its own, e.g. {normal.rstrip('/')}/devpi",
        )


def _caddy_admin(table: _Table) -> str:
    key = table.path("caddy_admin")
    value: str = table.get("caddy_admin", str)
    default = table.default("caddy_admin")
    socket = admin_socket(value)
    if socket is not None:
        raw = str(value)[len("unix/") :]
        # Unquoted in the Caddyfile; `|` is Caddy 2.8's mode suffix, which 2.6 takes as a name.
        if (
            not raw.startswith("/")
            or os.path.normpath(raw) != raw
            or any(ch.isspace() or ch in '"{}|#\\' or not ch.isprintable() for ch in raw)
        ):
            raise ConfigError(key, f"{value!r} is not unix//an/absolute/path of a socket")
        if len(raw.encode()) > _UNIX_SOCKET_PATH_MAX:
            raise ConfigError(key, f"the socket path is over {_UNIX_SOCKET_PATH_MAX} bytes")
        check_own_directory(key, socket.parent)
        return value
    if value.strip().lower() in {"", "off", "none", "false", "no", "disabled", "0"}:
        raise ConfigError(
            key,
            f"{value!r}: the agent reloads Caddy through its admin API, which cannot be off; "
            f"the default, {default}, is open to root and caddy only",
        )
    match = _HOST_PORT.fullmatch(value)
    if not match or not 1 <= int(match["port"]) <= 65535:
        raise ConfigError(key, f"{value!r} is neither unix//path nor host:port")
    host = match["host"].strip("[]")
    if host != "localhost" and not (is_ip_address(host) and ipaddress.ip_address(host).is_loopback):
        raise ConfigError(
            key,
            f"{value!r} is not on loopback: Caddy's admin API has no authentication, anyone "
            f"reaching it replaces the config; use {default} (the default) "
            "or 127.0.0.1:PORT",
        )
    return value


def _parse_tls_settings(table: _Table, tls: str) -> dict[str, Any]:
    """acme_ca / acme_ca_root / acme_preflight belong to "acme", cert_file / key_file to "files"."""
    mode_of = {
        "acme_ca": "acme",
        "acme_ca_root": "acme",
        "acme_preflight": "acme",
        "cert_file": "files",
        "key_file": "files",
    }
    for name, mode in mode_of.items():
        if name in table.data and tls != mode:
            raise ConfigError(table.path(name), f'only used with tls = "{mode}", not "{tls}"')
    acme_ca: str | None = table.get("acme_ca", str)
    if acme_ca is not None:
        _check_https_url(table.path("acme_ca"), acme_ca)
    acme_ca_root = _optional_absolute_path(table, "acme_ca_root")
    if acme_ca_root is not None and acme_ca is None:
        raise ConfigError(
            table.path("acme_ca_root"),
            "needs server.acme_ca (the default CA's root is already trusted)",
        )
    acme_preflight: bool = table.get("acme_preflight", bool)
    cert_file = _optional_absolute_path(table, "cert_file")
    key_file = _optional_absolute_path(table, "key_file")
    if tls == "files":
        for name, value in (("cert_file", cert_file), ("key_file", key_file)):
            if value is None:
                raise ConfigError(table.path(name), 'required with tls = "files"')
    return {
        "acme_ca": acme_ca,
        "acme_ca_root": acme_ca_root,
        "acme_preflight": acme_preflight,
        "cert_file": cert_file,
        "key_file": key_file,
    }


def _optional_absolute_path(table: _Table, name: str) -> Path | None:
    value: str | None = table.get(name, str)
    if value is None:
        return None
    return checked_path(table.path(name), value)


def _https_url(url: str) -> urllib.parse.SplitResult | None:
    """The parts of an https:// URL with a host and a valid port; None for anything else.

    It goes into the Caddyfile: only RFC 3986's characters, without the blanks, quotes, $ or
    braces Caddy would act on."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        return None
    if parts.scheme != "https" or not parts.hostname or not _URL_CHARS.fullmatch(url):
        return None
    return parts


def _check_https_url(key: str, url: str) -> None:
    if _https_url(url) is None:
        raise ConfigError(key, f"{url!r} is not an https:// URL of an ACME directory")


def _parse_devpi(table: _Table) -> DevpiConfig:
    port = _port(table, "port")
    user: str = table.get("user", str)
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", user) or user == "root":
        raise ConfigError(table.path("user"), f"{user!r} is not a valid unprivileged user name")
    devpi = DevpiConfig(
        port=port,
        user=user,
        home=_own_directory(table, "home"),
        venv=_own_directory(table, "venv"),
        root_password_file=_absolute_path(table, "root_password_file"),
        server_version=_version(table, "server_version"),
        web_version=_version(table, "web_version"),
        client_version=_version(table, "client_version"),
        indexer=_choice(table, "indexer", INDEXERS),
        mirror_project_list=table.get("mirror_project_list", bool),
        key_derivation=_choice(table, "key_derivation", KEY_DERIVATIONS),
        prune=table.get("prune", bool),
        upgrade=_choice(table, "upgrade", UPGRADE_MODES),
        # Replication's version floor first: it is the more pressing reason to refuse a version.
        **_parse_replication(table),
        **_parse_lock(table),
    )
    table.finish()
    return devpi


# The config keys that pin a devpi package, by package.
_PINNED_PACKAGES = {
    "server_version": "devpi-server",
    "web_version": "devpi-web",
    "client_version": "devpi-client",
}


def _parse_lock(table: _Table) -> dict[str, Any]:
    """Which lock builds the venv: the shipped one, the user's lock_file, or none (unlocked)."""
    unlocked: bool = table.get("unlocked", bool)
    lock_file = _optional_absolute_path(table, "lock_file")
    if unlocked and lock_file is not None:
        raise ConfigError(
            table.path("lock_file"), "cannot be used with unlocked = true: choose one"
        )
    if unlocked:
        return {"unlocked": True}
    key = table.path("lock_file")
    if lock_file is None:
        text, source = shipped_lock(), "the lock shipped in the agent"
    else:
        data = _read_bytes(key, lock_file, "lock file")
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise ConfigError(key, f"lock file {lock_file} is not UTF-8 text") from None
        source = f"lock file {lock_file}"
    try:
        pins = parse_lock(text)
    except LockError as error:
        raise ConfigError(key, f"lock file {lock_file}: {error}") from None
    for name, package in _PINNED_PACKAGES.items():
        version = table.get(name, str)
        locked = versions_of(pins, package)
        if version not in locked:
            have = ", ".join(sorted(locked)) or "none"
            where = table.path(name) if lock_file is None else key
            raise ConfigError(
                where,
                f"{package} {version} is not in {source} (it holds {have}): give a lock that "
                f"holds it as {table.path('lock_file')} (make one with `uv pip compile "
                f"--universal --generate-hashes`), or set {table.path('unlocked')} = true to "
                "install it unpinned",
            )
    if lock_file is None:
        return {}
    return {"lock_file": lock_file, "lock": text}


# Which roles each replication setting belongs to.
_REPLICATION_KEYS = {
    "replication_port": ("primary",),
    "replica_addresses": ("primary",),
    "replicas": ("primary",),
    "primary_url": ("replica",),
    "primary_ca_file": ("replica",),
    "replica_cert_file": ("replica",),
    "primary_proxy_port": ("replica",),
    "secret_file": ("primary", "replica"),
}
# devpi-server 6.20.2 fixed its check of a replica's identity on /+changelog; an older primary
# hands the changelog, password hashes included, to any request that looks like a replica's.
MIN_REPLICATION_SERVER_VERSION = (6, 20, 2)
_REPLICA_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# devpi-server refuses a secret shorter than this, or made of fewer distinct bytes.
MIN_SECRET_BYTES = 32
MIN_SECRET_DISTINCT_BYTES = 6


def _parse_replication(table: _Table) -> dict[str, Any]:
    role = _choice(table, "role", ROLES)
    for name, roles in _REPLICATION_KEYS.items():
        if name in table.data and role not in roles:
            wanted = " or ".join(f'"{r}"' for r in roles)
            raise ConfigError(table.path(name), f'only used with role = {wanted}, not "{role}"')
    settings: dict[str, Any] = {"role": role}
    if role != "standalone":
        _check_replication_version(table)
    if role == "primary":
        if "replication_port" not in table.data:
            raise ConfigError(
                table.path("replication_port"),
                'required with role = "primary": the port the replicas connect to',
            )
        settings["replication_port"] = _port(table, "replication_port")
        settings["replica_addresses"] = _replica_addresses(table)
        settings["replicas"] = _replica_names(table)
    if role == "replica":
        if "primary_url" not in table.data:
            raise ConfigError(
                table.path("primary_url"),
                'required with role = "replica": the primary\'s replication URL, '
                "https://<its domain>:<its replication_port>",
            )
        settings["primary_url"] = _primary_url(table.path("primary_url"), table)
        settings["primary_ca_file"] = _optional_absolute_path(table, "primary_ca_file")
        cert_key = table.path("replica_cert_file")
        cert_file = _optional_absolute_path(table, "replica_cert_file")
        if cert_file is None:
            raise ConfigError(
                cert_key,
                'required with role = "replica": the certificate its primary issued it, '
                "/etc/devpi-agent/replicas/<name>.pem on the primary (devpi.replicas there)",
            )
        settings["replica_cert_file"] = cert_file
        settings["replica_cert"] = _read_bytes(cert_key, cert_file, "certificate file")
        settings["primary_proxy_port"] = _port(table, "primary_proxy_port")
    secret_file = _optional_absolute_path(table, "secret_file")
    if role == "replica" and secret_file is None:
        raise ConfigError(
            table.path("secret_file"),
            'required with role = "replica": a copy of the primary\'s devpi secret',
        )
    if secret_file is not None:
        settings["secret_file"] = secret_file
        settings["secret"] = read_secret_file(table.path("secret_file"), secret_file)
    return settings


def _check_replication_version(table: _Table) -> None:
    version = str(table.data.get("server_version", table.default("server_version")))
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    if numbers < MIN_REPLICATION_SERVER_VERSION:
        oldest = ".".join(map(str, MIN_REPLICATION_SERVER_VERSION))
        raise ConfigError(
            table.path("server_version"),
            f"{version} is too old for replication: devpi-server before {oldest} gives its "
            "changelog (password hashes included) to requests that only look like a "
            f"replica's; pin {oldest} or later",
        )


def _primary_strings(
    table: _Table, name: str, missing: str, empty: str
) -> Iterator[tuple[str, str]]:
    """Each string of a non-empty list a primary must give, with its key for errors; one at a
    time, so the caller's check of an item comes before the next item's type check."""
    key = table.path(name)
    if name not in table.data:
        raise ConfigError(key, f'required with role = "primary": {missing}')
    items: list[Any] = table.get(name, list)
    if not items:
        raise ConfigError(key, empty)
    for n, item in enumerate(items):
        item_key = f"{key}[{n}]"
        if not isinstance(item, str):
            raise ConfigError(item_key, f"expected a string, got {_describe(item)}")
        yield item_key, item


def _replica_names(table: _Table) -> tuple[str, ...]:
    names: list[str] = []
    for item_key, item in _primary_strings(
        table,
        "replicas",
        'a name for each replica, e.g. ["eu-1"]; each gets a client certificate in '
        "/etc/devpi-agent/replicas/<name>.pem",
        "name at least one replica",
    ):
        if not _REPLICA_NAME.fullmatch(item):
            raise ConfigError(
                item_key, f"{item!r} is not a name of lowercase letters, digits and dashes"
            )
        if item in names:
            raise ConfigError(item_key, f"{item!r} is listed twice")
        names.append(item)
    return tuple(names)


def _replica_addresses(table: _Table) -> tuple[str, ...]:
    addresses: list[str] = []
    for item_key, item in _primary_strings(
        table,
        "replica_addresses",
        "the addresses of the replicas",
        "list at least one replica's IP address (or network)",
    ):
        try:
            # Digits, dots, colons and a prefix length only: no zone ID (::%x 0.0.0.0/0).
            if not re.fullmatch(r"[0-9A-Fa-f:./]+", item):
                raise ValueError(item)
            address = (
                str(ipaddress.ip_network(item, strict=True))
                if "/" in item
                else str(ipaddress.ip_address(item))
            )
        except ValueError:
            raise ConfigError(
                item_key, f"{item!r} is not an IP address or a network like 10.0.0.0/24"
            ) from None
        if address in addresses:
            raise ConfigError(item_key, f"{item!r} is listed twice")
        addresses.append(address)
    return tuple(addresses)


def _primary_url(key: str, table: _Table) -> str:
    url: str = table.get("primary_url", str)
    parts = _https_url(url)
    # Plain http is refused: relayed uploads carry users' passwords. A fragment has no place in
    # a server's URL.
    if parts is None or "#" in url:
        raise ConfigError(key, f"{url!r} is not an https:// URL")
    if parts.username or parts.password:
        raise ConfigError(key, "must not hold credentials: replicas authenticate with the secret")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(
            key,
            f"{url!r} has a path: give the primary's server URL, "
            "https://<domain>:<replication_port>, not an index URL",
        )
    return url.rstrip("/")


def _read_bytes(key: str, path: Path, what: str, *, denied: str = "") -> bytes:
    """A file the config names, or a ConfigError naming `key` and saying why it cannot be read."""
    return read_file(what, path, lambda reason: ConfigError(key, reason), denied=denied).data


def read_secret_file(key: str, path: Path) -> bytes:
    """devpi's signing secret, shared by a primary and its replicas; used byte for byte."""
    secret = _read_bytes(key, path, "secret file")
    if len(secret) < MIN_SECRET_BYTES or len(set(secret)) < MIN_SECRET_DISTINCT_BYTES:
        raise ConfigError(
            key,
            f"secret file {path} is too short or too uniform for devpi (at least "
            f"{MIN_SECRET_BYTES} bytes); copy the primary's, or make one with "
            "`openssl rand -base64 48`",
        )
    return secret


def _parse_apt(table: _Table) -> AptConfig:
    upgrade: bool = table.get("upgrade", bool)
    lock_timeout: int = table.get("lock_timeout", int)
    if lock_timeout < 0:
        raise ConfigError(table.path("lock_timeout"), "must be 0 or more seconds")
    table.finish()
    return AptConfig(upgrade=upgrade, lock_timeout=lock_timeout)


def _parse_caddy(table: _Table) -> CaddyConfig:
    source = _choice(table, "source", CADDY_SOURCES)
    table.finish()
    return CaddyConfig(source=source)


_SCHEDULE = re.compile(r"^[A-Za-z0-9*:/,.~ -]{1,100}$")


def _parse_backup(table: _Table) -> BackupConfig:
    enabled: bool = table.get("enabled", bool)
    directory = _own_directory(table, "dir")
    schedule: str = table.get("schedule", str)
    if not _SCHEDULE.fullmatch(schedule.strip()):
        raise ConfigError(table.path("schedule"), f"{schedule!r} is not a calendar expression")
    keep: int = table.get("keep", int)
    if keep < 1:
        raise ConfigError(table.path("keep"), "must keep at least 1 backup")
    remote = _parse_remote(table)
    table.finish()
    return BackupConfig(
        enabled=enabled, dir=directory, schedule=schedule.strip(), keep=keep, **remote
    )


REMOTE_SCHEMES: tuple[str, ...] = ("sftp:", "s3:", "rest:")
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
# restic's own settings the agent sets; an env file must not override them.
_RESTIC_OWN_ENV = frozenset({"RESTIC_REPOSITORY", "RESTIC_PASSWORD_FILE", "RESTIC_PASSWORD"})


def _root_only_file(key: str, path: Path, what: str) -> bytes:
    found = read_file(what, path, lambda reason: ConfigError(key, reason))
    if found.mode & 0o077:
        raise ConfigError(
            key, f"{what} {path} is readable by others (mode {found.mode:04o}): chmod 600 it"
        )
    return found.data


def _parse_remote(table: _Table) -> dict[str, Any]:
    """The [backup] remote_* keys, each checked; a remote needs its password file."""
    names = (
        "remote_password_file",
        "remote_env_file",
        "remote_ssh_key_file",
        "remote_known_hosts_file",
    )
    remote: str | None = table.get("remote", str)
    keep: int = table.get("remote_keep", int)
    paths = {name: _optional_absolute_path(table, name) for name in names}
    if remote is None:
        given = [name for name in names if paths[name] is not None]
        if given:
            raise ConfigError(table.path(given[0]), "only used with backup.remote")
        return {}
    key = table.path("remote")
    if not remote.startswith(REMOTE_SCHEMES) or any(c in remote for c in "\r\n\x00 "):
        wanted = ", ".join(f'"{s}..."' for s in REMOTE_SCHEMES)
        raise ConfigError(key, f"{remote!r} is not a restic repository like {wanted}")
    if re.match(r"^rest:https?://[^/@]*:[^/@]*@", remote):
        raise ConfigError(
            key,
            "must not hold a password (it would be in argv and logs): put RESTIC_REST_USERNAME "
            "and RESTIC_REST_PASSWORD in backup.remote_env_file",
        )
    if remote.startswith("sftp:"):
        sftp_target(remote, key)
    else:
        for name in ("remote_ssh_key_file", "remote_known_hosts_file"):
            if paths[name] is not None:
                raise ConfigError(table.path(name), "only used with an sftp: remote")
    if keep < 1:
        raise ConfigError(table.path("remote_keep"), "must keep at least 1 snapshot")
    password_file = paths["remote_password_file"]
    if password_file is None:
        raise ConfigError(
            table.path("remote_password_file"),
            "required with backup.remote: a root-only file holding the restic repository's "
            "password",
        )
    pw_key = table.path("remote_password_file")
    if not _root_only_file(pw_key, password_file, "password file").strip():
        raise ConfigError(pw_key, f"password file {password_file} is empty")
    env: tuple[tuple[str, str], ...] = ()
    if paths["remote_env_file"] is not None:
        env = _env_file(table.path("remote_env_file"), paths["remote_env_file"])
    if paths["remote_ssh_key_file"] is not None:
        _root_only_file(table.path("remote_ssh_key_file"), paths["remote_ssh_key_file"], "key")
    if paths["remote_known_hosts_file"] is not None:
        _read_bytes(
            table.path("remote_known_hosts_file"),
            paths["remote_known_hosts_file"],
            "known_hosts file",
        )
    return {
        "remote": remote,
        "remote_keep": keep,
        "remote_env": env,
        **{name: path for name, path in paths.items() if path is not None},
    }


def sftp_target(remote: str, key: str = "backup.remote") -> tuple[str, int | None, str]:
    """("user@host" or "host", port or None, path) of an sftp: remote, restic's two forms
    sftp:[user@]host:/path and sftp://[user@]host[:port]//path; ConfigError otherwise."""
    url = re.fullmatch(
        r"sftp://(?P<host>[^/:@]+@)?(?P<name>[^/:@\[\]]+)(?::(?P<port>\d+))?/(?P<path>.+)", remote
    )
    short = re.fullmatch(r"sftp:(?P<host>[^/:@]+@)?(?P<name>[^/:@\[\]]+):(?P<path>.+)", remote)
    match = url or short
    if match is None or match["name"].startswith("-") or (match["host"] or "").startswith("-"):
        raise ConfigError(key, f"{remote!r} is not sftp:[user@]host:/path")
    port = int(match["port"]) if url and match["port"] else None
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(key, f"port {port} is outside 1-65535")
    return f"{match['host'] or ''}{match['name']}", port, match["path"]


def _env_file(key: str, path: Path) -> tuple[tuple[str, str], ...]:
    """KEY=VALUE lines (blank lines and # comments skipped), for restic's environment."""
    try:
        text = _root_only_file(key, path, "env file").decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(key, f"env file {path} is not UTF-8") from None
    found: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip().removeprefix("export ").strip()
        if not sep or not _ENV_NAME.fullmatch(name):
            raise ConfigError(key, f"env file {path} line {number} is not NAME=VALUE")
        if name in _RESTIC_OWN_ENV:
            raise ConfigError(key, f"env file {path} line {number}: {name} is set by the agent")
        if "\x00" in value:
            raise ConfigError(key, f"env file {path} line {number} holds a NUL")
        value = value.strip()
        if len(value) > 1 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        found[name] = value
    return tuple(found.items())


def _parse_metrics(table: _Table) -> MetricsConfig:
    enabled: bool = table.get("enabled", bool)
    listen: str = table.get("listen", str)
    match = _HOST_PORT.fullmatch(listen)
    host = match["host"].strip("[]") if match else ""
    if not match or not is_ip_address(host) or not 1 <= int(match["port"]) <= 65535:
        raise ConfigError(
            table.path("listen"),
            f"{listen!r} is not IP:PORT (e.g. {table.default('listen')}, or [::1]:9449)",
        )
    backup_max_age: int = table.get("backup_max_age", int)
    if backup_max_age < 1:
        raise ConfigError(table.path("backup_max_age"), "must be 1 or more seconds")
    files_scan_interval: int = table.get("files_scan_interval", int)
    if files_scan_interval < 0:
        raise ConfigError(table.path("files_scan_interval"), "must be 0 or more seconds")
    table.finish()
    return MetricsConfig(
        enabled=enabled,
        listen=listen,
        backup_max_age=backup_max_age,
        files_scan_interval=files_scan_interval,
    )


def metrics_address(listen: str) -> tuple[str, int]:
    """The (host, port) of a validated `metrics.listen`."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def check_password(key: str, password: str) -> None:
    """Raise ConfigError (naming `key`) for a password bcrypt or devpi would not take."""
    _check_password(key, password)


def _check_password(key: str, password: str) -> None:
    if len(password) < 8:
        raise ConfigError(key, "password is shorter than 8 characters")
    if len(password.encode()) > BCRYPT_MAX_PASSWORD_BYTES:
        raise ConfigError(
            key, f"password is longer than {BCRYPT_MAX_PASSWORD_BYTES} bytes (bcrypt's limit)"
        )
    if any(ch in password for ch in "\r\n\x00"):
        raise ConfigError(key, "password contains a line break or NUL")


def read_password_file(key: str, path: Path) -> str:
    """A password file holds the password on its first line; a trailing newline is ignored."""
    raw = _read_bytes(key, path, "password file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(key, f"password file {path} is not UTF-8") from None
    password = text.removesuffix("\n").removesuffix("\r")
    _check_password(key, password)
    return password


def _array_of_tables(top: _Table, name: str, of: type[Any]) -> Iterator[_Table]:
    """Each table of the array `name` ([[users]]), for the dataclass `of`, one at a time: each
    is checked before the next one's type."""
    items: list[Any] = top.get(name, list)
    for position, item in enumerate(items):
        key = f"{name}[{position}]"
        if not isinstance(item, dict):
            raise ConfigError(key, f"expected a table, got {_describe(item)}")
        yield _Table(item, key, of)


def _parse_users(tables: Iterator[_Table]) -> tuple[User, ...]:
    users: list[User] = []
    for table in tables:
        name: str = table.get("name", str)
        if not _DEVPI_NAME.fullmatch(name):
            raise ConfigError(
                table.path("name"), f"{name!r} is not a valid user name (letters, digits, . _ -)"
            )
        if name == "root":
            raise ConfigError(
                table.path("name"), '"root" is devpi\'s admin, managed by devpi.root_password_file'
            )
        if any(u.name == name for u in users):
            raise ConfigError(table.path("name"), f"user {name!r} is declared twice")
        # Optional here, though a User always has one: password_file gives it otherwise.
        password: str | None = table.get("password", str, None)
        password_file_value: str | None = table.get("password_file", str)
        table.finish()
        if (password is None) == (password_file_value is None):
            raise ConfigError(table.key, "give exactly one of password or password_file")
        password_file: Path | None = None
        if password_file_value is not None:
            password_file = checked_path(table.path("password_file"), password_file_value)
            password = read_password_file(table.path("password_file"), password_file)
        else:
            assert password is not None
            _check_password(table.path("password"), password)
        users.append(User(name=name, password=password, password_file=password_file))
    if not users:
        raise ConfigError(
            "users", "declare at least one [[users]]: the index is password-protected"
        )
    return tuple(users)


def _split_index_name(key: str, value: object) -> tuple[str, str]:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {_describe(value)}")
    parts = value.split("/")
    if len(parts) != 2 or not all(_DEVPI_NAME.fullmatch(p) for p in parts):
        raise ConfigError(key, f"{value!r} is not of the form user/index")
    return parts[0], parts[1]


def _parse_indexes(tables: Iterator[_Table], users: tuple[User, ...]) -> tuple[Index, ...]:
    declared_users = {u.name for u in users}
    indexes: list[Index] = []
    for table in tables:
        user, name = _split_index_name(table.path("name"), table.get("name", str))
        if user == "root":
            raise ConfigError(table.path("name"), "indexes of root are managed by devpi itself")
        if user not in declared_users:
            raise ConfigError(table.path("name"), f"user {user!r} is not declared in [[users]]")
        if any(i.user == user and i.index == name for i in indexes):
            raise ConfigError(table.path("name"), f"index {user}/{name} is declared twice")
        bases_value: list[Any] = table.get("bases", list)
        bases: list[str] = []
        for n, base in enumerate(bases_value):
            base_key = f"{table.path('bases')}[{n}]"
            bases.append("/".join(_split_index_name(base_key, base)))
            if bases[-1] in bases[:-1]:
                raise ConfigError(base_key, f"{bases[-1]!r} is listed twice")
        table.finish()
        indexes.append(Index(user=user, index=name, bases=tuple(bases)))
    _check_bases(indexes)
    return tuple(indexes)


def _check_bases(indexes: list[Index]) -> None:
    declared = {i.name: i for i in indexes}
    for position, index in enumerate(indexes):
        for n, base in enumerate(index.bases):
            if base != "root/pypi" and base not in declared:
                raise ConfigError(
                    f"indexes[{position}].bases[{n}]",
                    f"{base!r} is neither root/pypi nor an index declared in [[indexes]]",
                )
    # A cycle of bases makes devpi recurse forever on lookups.
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = " -> ".join([*trail[trail.index(name) :], name])
            position = next(p for p, i in enumerate(indexes) if i.name == name)
            raise ConfigError(f"indexes[{position}].bases", f"bases form a cycle: {cycle}")
        state[name] = 1
        for base in declared[name].bases if name in declared else ():
            visit(base, [*trail, name])
        state[name] = 2

    for index in indexes:
        visit(index.name, [])


def parse(data: Mapping[str, Any], path: Path | None = None) -> Config:
    """Turn a TOML document into a validated Config, or raise ConfigError."""
    top = _Table(data, "", Config)
    if "server" not in data:
        raise ConfigError("server", "the [server] table is required (it holds the domain)")
    # In this order, so the first problem in the file is the one reported.
    config = Config(
        server=_parse_server(top.table("server", ServerConfig)),
        devpi=_parse_devpi(top.table("devpi", DevpiConfig)),
        apt=_parse_apt(top.table("apt", AptConfig)),
        caddy=_parse_caddy(top.table("caddy", CaddyConfig)),
        backup=_parse_backup(top.table("backup", BackupConfig)),
        metrics=_parse_metrics(top.table("metrics", MetricsConfig)),
        users=(users := _parse_users(_array_of_tables(top, "users", User))),
        indexes=_parse_indexes(_array_of_tables(top, "indexes", Index), users),
        path=path,
    )
    top.finish()
    _check_ports(config.server, config.devpi)
    _check_metrics_port(config)
    return config


def _check_metrics_port(config: Config) -> None:
    if not config.metrics.enabled:
        return
    _, port = metrics_address(config.metrics.listen)
    taken = {
        "server.https_port": config.server.https_port,
        "server.http_port": config.server.http_port,
        "devpi.port": config.devpi.port,
        "devpi.replication_port": config.devpi.replication_port,
    }
    if config.devpi.role == "replica":
        taken["devpi.primary_proxy_port"] = config.devpi.primary_proxy_port
    for name, used in taken.items():
        if used == port:
            raise ConfigError("metrics.listen", f"port {port} is already {name}")


def _check_ports(server: ServerConfig, devpi: DevpiConfig) -> None:
    """No port is two of the agent's: Caddy's sites, devpi-server's and a replica's proxy."""
    for name, port in (("https_port", server.https_port), ("http_port", server.http_port)):
        if port == devpi.port:
            raise ConfigError("devpi.port", f"port {port} is already server.{name}")
        if port == devpi.replication_port:
            raise ConfigError("devpi.replication_port", f"port {port} is already server.{name}")
    if devpi.replication_port == devpi.port:
        raise ConfigError("devpi.replication_port", f"port {devpi.port} is already devpi.port")
    if devpi.role == "replica":
        taken = {
            "server.https_port": server.https_port,
            "server.http_port": server.http_port,
            "devpi.port": devpi.port,
        }
        for name, port in taken.items():
            if port == devpi.primary_proxy_port:
                raise ConfigError("devpi.primary_proxy_port", f"port {port} is already {name}")


def load(path: Path) -> Config:
    """Read and validate the config file at `path`."""
    # The backup unit and cron line run `devpi-agent backup --config <path>`.
    checked_path("--config", str(path.absolute()))
    raw = _read_bytes("", path, "config file", denied=" (run as root?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError("", f"{path} is not UTF-8 (byte {error.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("", f"{path} is not valid TOML: {error}") from None
    return parse(data, path)
