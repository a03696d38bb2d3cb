"""Config values that try to inject into the files the agent writes (issue #12, item 5).

Each attack is the config a hostile or careless author would write; the test renders every file
that value reaches and fails if the injected directive or command is there. A fixed agent
refuses the config instead (ConfigError naming the key, exit 2).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import formats
import pytest
import yaml
from conftest import FakeRunner, make_ctx, reference_data
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from supervisor.datatypes import dict_of_key_value_pairs
from supervisor.options import UnhosedConfigParser

from agent.core.config import Config, ConfigError, load, parse
from agent.core.files import Unrepresentable, render
from agent.host import replication
from agent.steps import backup, caddy, devpi_config, supervisor

SECRET = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEF"


def rendered_files(tmp_path: Path, config: Config) -> dict[str, str]:
    """Every file a config's values reach, rendered as apply would write them."""
    ctx = make_ctx(tmp_path, config, FakeRunner())
    variables = backup._variables(ctx)
    return {
        "Caddyfile": caddy.content(ctx, (2, 6, 2), None),
        "devpi-server.yml": devpi_config.content(ctx),
        "supervisor-devpi-server.conf": supervisor.program_content(ctx),
        "devpi-agent-backup.service": render("devpi-agent-backup.service.j2", **variables),
        "devpi-agent-backup.timer": render("devpi-agent-backup.timer.j2", **variables),
        "devpi-agent-backup.cron": render(
            "devpi-agent-backup.cron.j2",
            cron_schedule="0 0 * * *",
            log_file=backup.CRON_LOG,
            **variables,
        ),
    }


def refused_or_rendered(tmp_path: Path, data: dict[str, Any], key: str) -> dict[str, str] | None:
    """None when parse() refuses the config naming `key`; else the rendered files."""
    try:
        config = parse(data)
    except ConfigError as error:
        assert error.key == key, error
        return None
    return rendered_files(tmp_path, config)


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def test_domain_zone_id_cannot_add_a_caddy_site_without_basic_auth(tmp_path: Path) -> None:
    data = reference_data()
    data["server"] = {
        "domain": "fe80::1%x]:443 {\nreverse_proxy 127.0.0.1:4040\n}",
        "tls": "internal",
    }
    files = refused_or_rendered(tmp_path, data, "server.domain")
    if files is not None:
        # The legitimate proxy line opens a block; a bare one is a site of the attacker's.
        assert "reverse_proxy 127.0.0.1:4040" not in lines(files["Caddyfile"]), files["Caddyfile"]
        assert "reverse_proxy 127.0.0.1:4040" not in lines(files["devpi-server.yml"])


def test_backup_dir_cannot_add_a_command_to_the_systemd_unit(tmp_path: Path) -> None:
    data = reference_data()
    data["backup"] = {
        "dir": "/var/backups/devpi\n[Service]\nExecStartPre=/bin/sh -c 'touch /tmp/pwned'"
    }
    files = refused_or_rendered(tmp_path, data, "backup.dir")
    if files is not None:
        service = files["devpi-agent-backup.service"]
        assert not any(line.startswith("ExecStartPre=") for line in lines(service)), service


def test_acme_email_cannot_read_caddys_environment(tmp_path: Path) -> None:
    data = reference_data()
    data["server"]["acme_email"] = "{$AWS_SECRET_ACCESS_KEY}@example.com"
    files = refused_or_rendered(tmp_path, data, "server.acme_email")
    if files is not None:
        # Caddy replaces {$VAR} from its environment wherever it appears in the Caddyfile.
        assert "{$" not in files["Caddyfile"], files["Caddyfile"]


def test_replica_address_zone_id_cannot_widen_the_replication_site(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    data = reference_data()
    data["server"] = {"domain": "pypi.example.com", "tls": "internal", "http_port": 0}
    data["devpi"] = {
        "role": "primary",
        "replication_port": 8444,
        "replica_addresses": ["10.0.0.5", "::%x 0.0.0.0/0"],
        "replicas": ["eu-1"],
        "secret_file": str(secret),
    }
    files = refused_or_rendered(tmp_path, data, "devpi.replica_addresses[1]")
    if files is not None:
        remote_ip = next(line for line in lines(files["Caddyfile"]) if line.startswith("remote_ip"))
        # 0.0.0.0/0 admits every IPv4 client to devpi's replication protocol.
        assert "0.0.0.0/0" not in remote_ip.split(), remote_ip


@pytest.mark.parametrize("directory", ["my configs", "x\nExecStartPre=touch pwned", "50%off"])
def test_config_path_cannot_split_the_backup_command(tmp_path: Path, directory: str) -> None:
    path = tmp_path / directory / "config.toml"
    path.parent.mkdir()
    path.write_text(
        '[server]\ndomain = "pypi.example.com"\nacme_email = "ops@example.com"\n'
        '[[users]]\nname = "devops"\npassword = "change-me"\n'
    )
    try:
        config = load(path)
    except ConfigError as error:
        assert error.key == "--config", error
        return
    files = rendered_files(tmp_path, config)
    unit = formats.systemd_unit(files["devpi-agent-backup.service"])
    argv = formats.systemd_exec(formats.systemd_value(unit, "Service", "ExecStart"))
    # As systemd and cron/sh split the command: the path stays one argument, unchanged.
    assert argv[1:] == ["backup", "--config", str(path)], argv
    cron_line = files["devpi-agent-backup.cron"].splitlines()[-1]
    argv = formats.cron_command(cron_line, str(backup.CRON_LOG))
    assert argv[2:] == ["backup", "--config", str(path)], argv


# --- property: every string-valued key, nasty values ------------------------------------------
# For each key a value is built around a base (prefix + base + suffix, the fixes made of quotes,
# braces, %, $, {$VAR}, newlines, unicode...). Either parse() refuses it naming that key, or
# every file parses in its own format and, with the value (as the Config holds it) replaced by
# the base's, is the very structure the base renders: the value sits where it belongs, whole,
# and nowhere else.

BCRYPT = "$2b$04$vnLW09wuDFphFKEaULf.7eKN72dlq6Rrc2udYRrpKu7X1Q0HW5Qja"
FRAGMENTS = [
    "\n",
    "\r",
    "\t",
    "\x00",
    "\x85",
    "\u2028",
    '"',
    "'",
    "`",
    "\\",
    "{",
    "}",
    "{$HOME}",
    "{http.request.uri}",
    "%",
    "%h",
    "%(here)s",
    "$",
    "$HOME",
    "${HOME}",
    "$$",
    " ",
    " #x",
    " ;x",
    "#",
    ";",
    ",",
    "=",
    ":",
    ": ",
    "[",
    "]",
    "/",
    "..",
    "-",
    "é",
    "日本",
    "\U0001f600",
    "\n[Service]\nExecStartPre=/bin/id\n",
    "\n}\n:9 {\nrespond 200\n}\n",
    "\nrole: replica\n",
]
_pieces = st.lists(
    st.one_of(
        st.sampled_from(FRAGMENTS),
        st.text(st.characters(blacklist_categories=("Cs", "Lu", "Lt")), max_size=3),
    ),
    max_size=3,
).map("".join)


def affixed(base: str) -> st.SearchStrategy[str]:
    return st.tuples(_pieces, _pieces).map(lambda fixes: fixes[0] + base + fixes[1])


def _set(path: str) -> Callable[[dict[str, Any], str], None]:
    table, _, name = path.rpartition(".")

    def setter(data: dict[str, Any], value: str) -> None:
        target: Any = data
        for part in re.findall(r"[^.\[\]]+", table):
            target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
        if name.endswith("]"):
            name_, index = name[:-1].split("[")
            target[name_][int(index)] = value
        else:
            target[name] = value

    return setter


@functools.cache
def _replica_bundle() -> bytes:
    """A replica's certificate and key, issued by the agent's own code with the real openssl."""
    from agent.core.runner import ShRunner
    from agent.host import replica_pki

    ca = replica_pki.new_ca(ShRunner())
    return replica_pki.issue(ShRunner(), ca, "eu-1").pem


def _data(kind: str, tmp_path: Path) -> dict[str, Any]:
    data = reference_data()
    data["devpi"] = {"user": "pypisvc", "home": "/srv/homemark", "venv": "/opt/venvmark"}
    data["backup"] = {"dir": "/var/backups/bkmark", "schedule": "daily"}
    if kind == "internal":
        data["server"] = {"domain": "pypi.example.com", "tls": "internal"}
    elif kind == "company-ca":
        data["server"]["acme_ca"] = "https://ca.example.net/acme/directory"
    elif kind in ("primary", "replica"):
        secret = tmp_path / "secret"
        secret.write_bytes(SECRET)
        data["devpi"]["secret_file"] = str(secret)
        data["devpi"]["role"] = kind
        if kind == "primary":
            data["server"] = {"domain": "pypi.example.com", "tls": "internal", "http_port": 0}
            data["devpi"]["replication_port"] = 8444
            data["devpi"]["replica_addresses"] = ["10.0.0.5"]
            data["devpi"]["replicas"] = ["eu-1"]
        else:
            data["devpi"]["primary_url"] = "https://primary.example.net:8444"
            bundle = tmp_path / "replica.pem"
            bundle.write_bytes(_replica_bundle())
            data["devpi"]["replica_cert_file"] = str(bundle)
    return data


def _getter(attribute: str) -> Callable[[Config], str]:
    def get(config: Config) -> str:
        value: Any = config
        for part in attribute.split("."):
            value = value[int(part)] if part.isdigit() else getattr(value, part)
        return str(value)

    return get


# key -> (config kind, base value, where the parsed Config holds it)
KEYS: dict[str, tuple[str, str, str]] = {
    "server.domain": ("acme", "pypi.example.com", "server.domain"),
    "server.acme_email": ("acme", "ops@example.com", "server.acme_email"),
    "server.acme_ca": ("company-ca", "https://ca.example.net/acme/directory", "server.acme_ca"),
    "server.caddy_admin": ("acme", "localhost:2019", "server.caddy_admin"),
    "devpi.user": ("acme", "pypisvc", "devpi.user"),
    "devpi.home": ("acme", "/srv/homemark", "devpi.home"),
    "devpi.venv": ("acme", "/opt/venvmark", "devpi.venv"),
    "devpi.root_password_file": ("acme", "/etc/rootpassmark", "devpi.root_password_file"),
    "devpi.server_version": ("acme", "6.20.3", "devpi.server_version"),
    "devpi.primary_url": ("replica", "https://primary.example.net:8444", "devpi.primary_url"),
    "devpi.replica_addresses[0]": ("primary", "10.0.0.5", "devpi.replica_addresses.0"),
    "backup.dir": ("acme", "/var/backups/bkmark", "backup.dir"),
    "backup.schedule": ("acme", "daily", "backup.schedule"),
    "users[0].name": ("acme", "devops", "users.0.name"),
    "users[0].password": ("acme", "change-me", "users.0.password"),
    "indexes[0].name": ("acme", "devops/pypi", "indexes.0.name"),
}


def caddy_json(text: str, directory: Path) -> Any:
    caddyfile = directory / "Caddyfile"
    caddyfile.write_text(text)
    adapted = subprocess.run(
        [CADDY, "adapt", "--config", str(caddyfile), "--adapter", "caddyfile"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "CANARY": "caddy-read-its-env"},
    )
    if adapted.returncode != 0:
        raise CaddyRefused(adapted.stderr)
    return json.loads(adapted.stdout)


class CaddyRefused(AssertionError):
    """`caddy adapt` refused the Caddyfile (as the caddy step's `caddy validate` would)."""


def supervisor_program(text: str) -> dict[str, Any]:
    parser = UnhosedConfigParser()
    parser.read_string(text)
    (section,) = parser.sections()
    program: dict[str, Any] = {"section": section}
    for key, raw in parser.items(section):
        value = raw % {}  # supervisor expands %(name)s; %% is a percent sign
        if key == "command":
            program[key] = shlex.split(value)
        elif key == "environment":
            program[key] = dict_of_key_value_pairs(value)
        else:
            program[key] = value
    return program


def systemd_units(service: str, timer: str, directory: Path) -> Any:
    for name, text in (
        ("devpi-agent-backup.service", service),
        ("devpi-agent-backup.timer", timer),
    ):
        (directory / name).write_text(text)
    if SYSTEMD_ANALYZE:
        verified = subprocess.run(
            [SYSTEMD_ANALYZE, "verify", "--man=no", str(directory / "devpi-agent-backup.timer")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert verified.returncode == 0, (service, timer, verified.stderr)
    unit = formats.systemd_unit(service)
    timer_unit = formats.systemd_unit(timer)
    interpreted = {("Unit", "Description"), ("Service", "ExecStart"), ("Timer", "OnCalendar")}
    return {
        # Every other setting as written; these three as systemd reads them.
        "service": [e for e in unit if e[:2] not in interpreted],
        "timer": [e for e in timer_unit if e[:2] not in interpreted],
        "description": formats.specifiers(formats.systemd_value(unit, "Unit", "Description")),
        "exec": formats.systemd_exec(formats.systemd_value(unit, "Service", "ExecStart")),
        "timer-description": formats.specifiers(
            formats.systemd_value(timer_unit, "Unit", "Description")
        ),
        "calendar": formats.specifiers(formats.systemd_value(timer_unit, "Timer", "OnCalendar")),
    }


def parsed_files(files: dict[str, str], directory: Path) -> dict[str, Any]:
    """Each file as its own reader sees it; a parse failure fails the test."""
    cron_line = files["devpi-agent-backup.cron"].splitlines()[-1]
    return {
        "caddy": caddy_json(files["Caddyfile"], directory),
        "yaml": yaml.safe_load(files["devpi-server.yml"]),
        "supervisor": supervisor_program(files["supervisor-devpi-server.conf"]),
        "systemd": systemd_units(
            files["devpi-agent-backup.service"], files["devpi-agent-backup.timer"], directory
        ),
        "cron": formats.cron_command(cron_line, str(backup.CRON_LOG)),
    }


def replaced(tree: Any, old: str, new: str) -> Any:
    if isinstance(tree, str):
        return tree.replace(old, new)
    if isinstance(tree, dict):
        return {replaced(k, old, new): replaced(v, old, new) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(replaced(v, old, new) for v in tree)
    return tree


def calendar_ok(schedule: str) -> bool:
    checked = subprocess.run(
        [SYSTEMD_ANALYZE or "systemd-analyze", "calendar", schedule],
        capture_output=True,
        timeout=60,
    )
    return checked.returncode == 0


CADDY = shutil.which("caddy") or ""
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or ""


@pytest.fixture(autouse=True)
def fixed_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    # bcrypt salts differ per render; the hash is not what these tests are about.
    monkeypatch.setattr(caddy, "hash_for", lambda *args, **kwargs: BCRYPT)
    monkeypatch.setattr(backup, "agent_executable", lambda: Path("/bin/true"))


def check_value(key: str, value: str, tmp_path: Path, cache: dict[str, Any]) -> None:
    kind, _base, attribute = KEYS[key]
    get = _getter(attribute)
    data = _data(kind, tmp_path)
    _set(key)(data, value)
    if key == "users[0].name":
        data["indexes"][0]["name"] = f"{value}/pypi"
    try:
        config = parse(data)
    except ConfigError as error:
        assert error.key == key, (value, error)
        event("refused")
        return
    if key == "backup.schedule" and not calendar_ok(config.backup.schedule):
        return  # the backup step refuses it before writing anything (systemd-analyze calendar)
    if kind not in cache:
        reference = parse(_data(kind, tmp_path))
        cache[kind] = (get(reference), rendered_files(tmp_path, reference))
    base_value, reference_files = cache[kind]
    files = rendered_files(tmp_path, config)
    if files == reference_files:
        event("accepted, in no file")
        return
    event("accepted, rendered")
    expected = get(config)
    directory = Path(tempfile.mkdtemp(dir=tmp_path))
    ours = replaced(parsed_files(files, directory), expected, base_value)
    theirs = parsed_files(reference_files, Path(tempfile.mkdtemp(dir=tmp_path)))
    assert ours == theirs, (key, value, files)


PROPERTY = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.parametrize("key", sorted(KEYS))
@PROPERTY
@given(data=st.data())
def test_every_string_value_is_refused_or_stays_one_value(
    tmp_path: Path, key: str, data: st.DataObject
) -> None:
    assert CADDY, "caddy is not installed (apt-get install caddy): the Caddyfile check needs it"
    value = data.draw(affixed(KEYS[key][1]), label=key)
    check_value(key, value, tmp_path, CACHE.setdefault(key, {}))


CACHE: dict[str, dict[str, Any]] = {}


# --- property: the templates alone, with validation bypassed ----------------------------------
# Defence in depth: a value set straight into the parsed Config (as if validation had a gap)
# either makes rendering refuse (Unrepresentable), or `caddy adapt` refuse the Caddyfile (the
# caddy step runs `caddy validate` before a file goes live), or every file holds the value whole.

# attribute -> config kind. Not server.domain: Caddy reads a site address with a grammar of
# its own (host, [IPv6], :port), which no token quoting can keep whole (pypi.example.com[ makes
# a host "pypi.example.com[:443"); only validation (a DNS name or a plain IP) does. The token
# filter still keeps it one token: no new site or directive (the attack test above).
RAW: dict[str, str] = {
    "server.acme_email": "acme",
    "server.acme_ca": "company-ca",
    "devpi.user": "acme",
    "devpi.home": "acme",
    "devpi.venv": "acme",
    "devpi.primary_url": "replica",
    "devpi.replica_addresses.0": "primary",
    "backup.dir": "acme",
    "backup.schedule": "acme",
    "users.0.name": "acme",
    "path": "acme",
}
PATHS = {"devpi.home", "devpi.venv", "backup.dir", "path"}


def with_value(config: Config, attribute: str, value: str) -> Config:
    if attribute == "path":
        return dataclasses.replace(config, path=Path(value))
    if attribute == "users.0.name":
        user = dataclasses.replace(config.users[0], name=value)
        return dataclasses.replace(config, users=(user, *config.users[1:]))
    table, name = attribute.split(".", 1)
    section = getattr(config, table)
    new: Any = Path(value) if attribute in PATHS else value
    if name == "replica_addresses.0":
        name, new = "replica_addresses", (value,)
    return dataclasses.replace(config, **{table: dataclasses.replace(section, **{name: new})})


def raw_base(config: Config, attribute: str) -> str:
    if attribute == "path":
        return str(config.path)
    return _getter(attribute)(config)


@pytest.mark.parametrize("attribute", sorted(RAW))
@PROPERTY
@given(data=st.data())
def test_templates_quote_any_value_or_refuse_it(
    tmp_path: Path, attribute: str, data: st.DataObject
) -> None:
    reference = parse(_data(RAW[attribute], tmp_path), Path("/etc/devpi-agent/config.toml"))
    base = raw_base(reference, attribute)
    value = data.draw(affixed(base), label=attribute)
    config = with_value(reference, attribute, value)
    expected = raw_base(config, attribute)
    try:
        files = rendered_files(tmp_path, config)
    except (Unrepresentable, ValueError):  # ValueError: urlsplit of a broken primary_url
        event("refused by a template filter")
        return
    if attribute == "backup.schedule" and not calendar_ok(value):
        return  # the backup step refuses it before writing anything (systemd-analyze calendar)
    reference_files = rendered_files(tmp_path, reference)
    if files == reference_files:
        event("in no file")
        return
    try:
        parsed = parsed_files(files, Path(tempfile.mkdtemp(dir=tmp_path)))
    except CaddyRefused:
        event("refused by caddy adapt")
        return
    event("rendered")
    # An IPv6-looking domain is bracketed in URLs and site addresses.
    pairs = [(f"[{expected}]", base), (expected, base)]
    if attribute == "devpi.primary_url":
        host = replication.primary_host(config)
        pairs.append((f"primary, {host}, which", "primary, primary.example.net, which"))
    ours = parsed
    for old, new in pairs:
        ours = replaced(ours, old, new)
    theirs = parsed_files(reference_files, Path(tempfile.mkdtemp(dir=tmp_path)))
    assert ours == theirs, (attribute, value, files)
