"""`devpi-agent user-data`: a ready-to-paste cloud-init user-data, rendered from the same template
as the committed cloud-init.yaml (units/cloud-init.yaml.j2), so nobody edits YAML by hand.

The config it carries is checked with the agent's own parser before anything is printed, so a
server never boots with a config the agent would refuse.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from agent import __version__
from agent.core.config import ConfigError, ServerConfig, parse
from agent.core.files import atomic_write, render

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - CPython 3.10 has no tomllib; tomli is the same parser
    import tomli as tomllib

TEMPLATE = "cloud-init.yaml.j2"
# The GitHub repository whose releases carry the agent (Makefile: RELEASE_REPO).
DEFAULT_RELEASE_REPO = "devpi-agent/devpi-agent"
RELEASES = "https://github.com/{repo}/releases"
DEFAULT_AGENT_URL = f"{RELEASES.format(repo=DEFAULT_RELEASE_REPO)}/latest/download/devpi-agent"
# EC2 refuses user data over 16 KB.
MAX_USER_DATA_BYTES = 16 * 1024
# A config or script still holding this marker refuses to run on the server.
PLACEHOLDER = "<FILL-IN"
GENERATED_PASSWORD_BYTES = 18  # 24 URL-safe characters
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_URL = re.compile(r"^(https?://[^\s'\"\\]+|file:///[^\s'\"\\]+|/[^\s'\"\\]+)$")
EXIT_USAGE = 2


@dataclass(frozen=True)
class Account:
    name: str
    password: str
    generated: bool = False


@dataclass(frozen=True)
class UserData:
    """Everything the template needs, unquoted; render() quotes for TOML and the shell."""

    domain: str
    agent_url: str
    agent_sha256: str
    users: tuple[Account, ...]
    # The config's own defaults: a user data left at them configures what the agent would.
    tls: str = ServerConfig.tls
    acme_email: str | None = ServerConfig.acme_email
    https_port: int = ServerConfig.https_port
    http_port: int = ServerConfig.http_port
    placeholders: bool = False


def placeholder_user_data(agent_url: str = DEFAULT_AGENT_URL) -> UserData:
    """The committed cloud-init.yaml: every value a person must choose is a marked placeholder."""
    return UserData(
        domain=f"{PLACEHOLDER}: pypi.example.com>",
        acme_email=f"{PLACEHOLDER}: ops@example.com>",
        users=(Account("devops", f"{PLACEHOLDER}: a password>"),),
        agent_url=agent_url,
        agent_sha256=f"{PLACEHOLDER}: sha256 of devpi-agent from the release SHA256SUMS>",
        placeholders=True,
    )


def _toml(value: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes).
    return json.dumps(value, ensure_ascii=False)


def render_user_data(data: UserData) -> str:
    """The user-data text; raises ValueError if it is not something a server should boot."""
    if not _URL.fullmatch(data.agent_url):
        raise ValueError(
            f"agent URL {data.agent_url!r} is not an http(s):// or file:/// URL or absolute path"
        )
    if not data.placeholders and not _SHA256.fullmatch(data.agent_sha256):
        raise ValueError(f"{data.agent_sha256!r} is not a sha256 (64 lowercase hex digits)")
    text = render(
        TEMPLATE,
        placeholders=data.placeholders,
        domain=_toml(data.domain),
        tls=_toml(data.tls),
        acme_email=_toml(data.acme_email) if data.acme_email else None,
        https_port=data.https_port,
        http_port=data.http_port,
        users=[
            {"name": _toml(u.name), "password": _toml(u.password), "index": _toml(f"{u.name}/pypi")}
            for u in data.users
        ],
        agent_url=shlex.quote(data.agent_url),
        agent_sha256=shlex.quote(data.agent_sha256),
    )
    if not data.placeholders:
        parse(tomllib.loads(config_toml(text)))
    size = len(text.encode())
    if size > MAX_USER_DATA_BYTES:
        raise ValueError(f"user data is {size} bytes, over EC2's limit of {MAX_USER_DATA_BYTES}")
    return text


def config_toml(user_data: str) -> str:
    """The /etc/devpi-agent/config.toml that a user-data writes."""
    return written_file(user_data, "/etc/devpi-agent/config.toml")


def written_file(user_data: str, path: str) -> str:
    """The content of one of the user data's write_files entries (as this template lays it out)."""
    lines = user_data.splitlines()
    start = lines.index(f"  - path: {path}")
    content = next(n for n in range(start, len(lines)) if lines[n].strip() == "content: |")
    block: list[str] = []
    for line in lines[content + 1 :]:
        if line and not line.startswith("      "):
            break
        block.append(line[6:])
    return "\n".join(block).strip("\n") + "\n"


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _parse_user(spec: str, generate: bool) -> Account:
    name, has_password, password = spec.partition(":")
    if has_password and generate:
        raise click.BadParameter(
            f"{name}: --generate-passwords and a given password exclude each other",
            param_hint="--user",
        )
    if not has_password:
        return Account(name, secrets.token_urlsafe(GENERATED_PASSWORD_BYTES), generated=True)
    return Account(name, password)


def _agent_source(
    agent_url: str | None, agent_sha256: str | None, agent_file: Path | None
) -> tuple[str, str, str | None]:
    """(url, sha256, a note for stderr): the sha256 of a file at hand beats typing one."""
    if agent_sha256 and agent_file:
        raise click.UsageError("give --agent-sha256 or --agent-file, not both")
    if agent_sha256:
        return agent_url or DEFAULT_AGENT_URL, agent_sha256.lower(), None
    if agent_file:
        sha = _sha256_of(agent_file)
        return agent_url or DEFAULT_AGENT_URL, sha, f"agent sha256 {sha} from {agent_file}"
    running = os.environ.get("PEX")
    if running and Path(running).is_file():
        sha = _sha256_of(Path(running))
        # This very file, pinned: the "latest" release moves on and would stop matching.
        url = agent_url or (
            f"{RELEASES.format(repo=DEFAULT_RELEASE_REPO)}/download/v{__version__}/devpi-agent"
        )
        return url, sha, f"agent sha256 {sha} from the running agent {running} ({__version__})"
    raise click.UsageError(
        "say which agent the server runs: --agent-sha256 (from the release's SHA256SUMS) "
        "or --agent-file PATH"
    )


@click.command("user-data")
@click.option("--domain", help="The server's DNS name (or IP address with --tls internal).")
@click.option("--email", "acme_email", help="E-mail for the ACME account (Let's Encrypt).")
@click.option(
    "--tls", type=click.Choice(["acme", "internal"]), default=ServerConfig.tls, show_default=True
)
@click.option("--https-port", type=int, default=ServerConfig.https_port, show_default=True)
@click.option(
    "--http-port",
    type=int,
    default=ServerConfig.http_port,
    show_default=True,
    help="0 turns it off.",
)
@click.option(
    "--user",
    "user_specs",
    multiple=True,
    metavar="NAME[:PASSWORD]",
    help="A devpi user with an index NAME/pypi (repeatable; default: devops). "
    "Without :PASSWORD a password is generated.",
)
@click.option(
    "--generate-passwords", is_flag=True, help="Generate every user's password (the default)."
)
@click.option("--agent-url", help="Where the server downloads the agent (URL or local path).")
@click.option("--agent-sha256", help="The agent's sha256 (the release's SHA256SUMS).")
@click.option(
    "--agent-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Take the sha256 from this copy of the agent.",
)
@click.option(
    "--placeholders",
    is_flag=True,
    help="Render the committed cloud-init.yaml: <FILL-IN> markers instead of values.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write here (mode 0600) instead of stdout.",
)
def user_data(
    domain: str | None,
    acme_email: str | None,
    tls: str,
    https_port: int,
    http_port: int,
    user_specs: tuple[str, ...],
    generate_passwords: bool,
    agent_url: str | None,
    agent_sha256: str | None,
    agent_file: Path | None,
    placeholders: bool,
    output: Path | None,
) -> None:
    """Print a ready-to-paste cloud-init user data that turns a fresh server into this agent's
    PyPI server. Generated passwords are printed once, to stderr; they end up only in the user
    data and, on the server, in /etc/devpi-agent/config.toml (root-only), never in a log."""
    if placeholders:
        data = placeholder_user_data(agent_url or DEFAULT_AGENT_URL)
        notes: list[str] = []
    else:
        if not domain:
            raise click.UsageError("--domain is required")
        accounts = tuple(_parse_user(s, generate_passwords) for s in user_specs or ("devops",))
        url, sha, note = _agent_source(agent_url, agent_sha256, agent_file)
        data = UserData(
            domain=domain,
            tls=tls,
            acme_email=acme_email,
            https_port=https_port,
            http_port=http_port,
            users=accounts,
            agent_url=url,
            agent_sha256=sha,
        )
        notes = [note] if note else []
    try:
        text = render_user_data(data)
    except ConfigError as error:
        click.echo(f"devpi-agent user-data: {error}", err=True)
        sys.exit(EXIT_USAGE)
    except ValueError as error:
        click.echo(f"devpi-agent user-data: {error}", err=True)
        sys.exit(EXIT_USAGE)
    if output is None:
        click.echo(text, nl=False)
    else:
        # A new 0600 file renamed into place: an existing file's inode (and whoever holds it
        # open at its old mode) never gets a byte, and a link at `output` is replaced, not
        # followed.
        atomic_write(output, text.encode("utf-8"), mode=0o600, owner=None)
    for note in notes:
        click.echo(f"devpi-agent user-data: {note}", err=True)
    generated = [a for a in data.users if a.generated]
    for account in generated:
        click.echo(f"generated password for {account.name}: {account.password}", err=True)
    if generated:
        where = output or "the user data"
        click.echo(
            f"These passwords are shown once. They are in {where} and, on the server, in "
            "/etc/devpi-agent/config.toml (root-only); the agent never logs them.",
            err=True,
        )
