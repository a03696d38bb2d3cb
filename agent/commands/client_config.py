"""`devpi-agent client-config`: the client settings of one user, as shell commands to paste.

The output is a bash (or fish) snippet that a user pastes into a shell on their own machine:
it writes ~/.pypirc (twine), ~/.config/pip/pip.conf (pip) and exports UV_DEFAULT_INDEX (uv),
with the URLs each tool wants (the index URL for uploads, its /+simple/ for installs) and the
credentials URL-encoded where they sit in a URL. With tls = "internal" (or a company ACME CA,
acme_ca_root) it first saves a CA bundle (the client's system roots plus that root) and points
every tool at it.

Reading the passwords needs root, as the config is root's alone.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import click

from agent.commands.support import (
    EXIT_CONFIG,
    EXIT_FAILED,
    config_option,
    fail,
    load_config,
    require_root,
)
from agent.core.config import Config

Shell = Literal["bash", "fish"]
Format = Literal["pip", "pypirc", "uv", "all"]
# Where clients keep their system roots: Debian/Ubuntu/Alpine, Fedora/RHEL, macOS/BSD.
CLIENT_SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
)
# The only shell variable the snippets use: the CA bundle's path on the client.
CA_VAR = "devpi_ca"


@dataclass(frozen=True)
class ClientSettings:
    user: str
    password: str = field(repr=False)
    index: str
    outside_url: str
    ca_pem: str | None = None  # Caddy's local root (tls internal); None: system roots suffice
    ca_source: Path | None = None  # where that root lives on the server

    @property
    def index_url(self) -> str:
        """What twine uploads to."""
        return f"{self.outside_url}/{self.index}/"

    @property
    def simple_url(self) -> str:
        """What pip and uv install from, credentials URL-encoded into it."""
        parts = urllib.parse.urlsplit(self.outside_url)
        user = urllib.parse.quote(self.user, safe="")
        password = urllib.parse.quote(self.password, safe="")
        return f"{parts.scheme}://{user}:{password}@{parts.netloc}/{self.index}/+simple/"

    @property
    def label(self) -> str:
        """The server's name as a file name: host, and port unless 443."""
        netloc = urllib.parse.urlsplit(self.outside_url).netloc
        return re.sub(r"[^A-Za-z0-9.-]+", "-", netloc).strip("-")


# --- shells -----------------------------------------------------------------------------------

# A line of a file: literal text, with CA_REF standing for the CA bundle's path on the client.
CA_REF = "\0ca\0"


class ShellWriter:
    """Turns file contents and variables into commands for one shell; quoting is its job."""

    def __init__(self, shell: Shell) -> None:
        self.shell = shell
        self.lines: list[str] = []

    def blank(self) -> None:
        self.lines.append("")

    def comment(self, text: str) -> None:
        self.lines.extend(f"# {line}".rstrip() for line in text.splitlines())

    def quote(self, text: str) -> str:
        if self.shell == "fish":
            return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
        return "'" + text.replace("'", "'\\''") + "'"

    def _with_ca(self, line: str) -> str:
        """A double-quoted word in which the CA variable expands and nothing else does."""
        if self.shell == "fish":
            escape = {"\\": "\\\\", '"': '\\"', "$": "\\$"}
        else:
            escape = {"\\": "\\\\", '"': '\\"', "$": "\\$", "`": "\\`"}
        parts = ["".join(escape.get(ch, ch) for ch in part) for part in line.split(CA_REF)]
        return '"' + f"${CA_VAR}".join(parts) + '"'

    def word(self, line: str) -> str:
        return self._with_ca(line) if CA_REF in line else self.quote(line)

    def set_ca_path(self, directory: str, name: str) -> None:
        self.lines.append(f"mkdir -p {self.home(directory)}")
        path = self.home(f"{directory}/{name}")
        if self.shell == "fish":
            self.lines.append(f"set -g {CA_VAR} {path}")
        else:
            self.lines.append(f"{CA_VAR}={path}")

    def system_roots_into_ca(self, bundles: Sequence[str]) -> None:
        candidates = " ".join(bundles)
        if self.shell == "fish":
            self.lines += [
                f"for bundle in {candidates}",
                "    if test -r $bundle; cat $bundle; break; end",
                f"end > {self.ca_target()}",
            ]
        else:
            self.lines += [
                f"for bundle in {candidates}; do",
                '    if [ -r "$bundle" ]; then cat "$bundle"; break; fi',
                f"done > {self.ca_target()}",
            ]

    def write_file(self, target: str, lines: Sequence[str], *, append: bool = False) -> None:
        """Write `lines` to `target` (a word from home() or ca_target()) exactly as given.

        printf with one quoted word per line, not a heredoc: an interactive bash would apply
        history expansion to a `!` in a heredoc (a password), never inside single quotes.
        """
        redirect = ">>" if append else ">"
        words = " \\\n    ".join(self.word(line) for line in lines)
        self.lines.append(f"printf '%s\\n' {words} {redirect} {target}")

    def backup(self, path: str) -> None:
        """Keep a user's own file (once) before the first overwrite."""
        if self.shell == "fish":
            self.lines.append(
                f"test -e {self.home(path)}; and cp -n {self.home(path)} {self.home(path + '.bak')}"
            )
        else:
            self.lines.append(
                f"[ ! -e {self.home(path)} ] || cp -n {self.home(path)} {self.home(path + '.bak')}"
            )

    def run(self, *words: str) -> None:
        self.lines.append(" ".join(words))

    def export(self, name: str, value: str) -> None:
        if self.shell == "fish":
            self.lines.append(f"set -gx {name} {self.word(value)}")
        else:
            self.lines.append(f"export {name}={self.word(value)}")

    @staticmethod
    def home(path: str) -> str:
        """A path under the client's home, as a word both shells expand: "$HOME/..."."""
        return f'"$HOME/{path}"'

    @staticmethod
    def ca_target() -> str:
        return f'"${CA_VAR}"'

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


# --- the settings -----------------------------------------------------------------------------

# Relative to the client's home.
PYPIRC = ".pypirc"
PIP_CONF_DIR = ".config/pip"
PIP_CONF = f"{PIP_CONF_DIR}/pip.conf"
CA_DIR = ".config/devpi-agent"


def pypirc_lines(settings: ClientSettings) -> list[str]:
    lines = [
        "[distutils]",
        "index-servers = devpi",
        "",
        "[devpi]",
        f"repository = {settings.index_url}",
        f"username = {settings.user}",
        f"password = {settings.password}",
    ]
    if settings.ca_pem:
        lines.append(f"ca_cert = {CA_REF}")
    return lines


def pip_conf_lines(settings: ClientSettings) -> list[str]:
    lines = ["[global]", f"index-url = {settings.simple_url}"]
    if settings.ca_pem:
        lines.append(f"cert = {CA_REF}")
    return lines


def render(settings: ClientSettings, fmt: Format, shell: Shell) -> str:
    out = ShellWriter(shell)
    home = out.home
    out.comment(
        f"devpi client settings: user {settings.user}, index {settings.index} at "
        f"{settings.outside_url}\n"
        f"Paste into a {shell} shell on the client. It holds the password: keep it private."
    )
    if settings.ca_pem:
        out.blank()
        where = f" ({settings.ca_source} on the server)" if settings.ca_source else ""
        out.comment(
            f"The server's certificate comes from a private CA{where}: trust it,\n"
            "kept with this machine's system roots in one bundle that twine, pip and uv read."
        )
        out.set_ca_path(CA_DIR, f"{settings.label}-ca.pem")
        out.system_roots_into_ca(CLIENT_SYSTEM_BUNDLES)
        # The blank line keeps a system bundle without a final newline from gluing onto it.
        pem_lines = ["", *settings.ca_pem.strip().splitlines()]
        out.write_file(out.ca_target(), pem_lines, append=True)
    if fmt in ("pypirc", "all"):
        out.blank()
        out.comment("twine: ~/.pypirc (an existing one is kept once as ~/.pypirc.bak)")
        out.comment("upload with: twine upload -r devpi dist/*")
        out.backup(PYPIRC)
        out.write_file(home(PYPIRC), pypirc_lines(settings))
        out.run("chmod 600", home(PYPIRC))
    if fmt in ("pip", "all"):
        out.blank()
        out.comment("pip: ~/.config/pip/pip.conf (an existing one is kept once as pip.conf.bak)")
        out.comment("install with: pip install <package>")
        out.run("mkdir -p", home(PIP_CONF_DIR))
        out.backup(PIP_CONF)
        out.write_file(home(PIP_CONF), pip_conf_lines(settings))
        out.run("chmod 600", home(PIP_CONF))
    if fmt in ("uv", "all"):
        out.blank()
        startup = "~/.config/fish/config.fish" if shell == "fish" else "~/.bashrc"
        out.comment(f"uv: for this shell (add these lines to {startup} to keep them)")
        out.comment("install with: uv pip install <package>")
        out.export("UV_DEFAULT_INDEX", settings.simple_url)
        if settings.ca_pem:
            out.export("SSL_CERT_FILE", CA_REF)
    return out.text()


def settings_for(
    config: Config,
    user_name: str,
    index_name: str | None,
    ca_pem: str | None,
    ca_source: Path | None,
) -> ClientSettings:
    users = {u.name: u for u in config.users}
    if user_name not in users:
        raise LookupError(
            f"user {user_name!r} is not in the config; users: {', '.join(sorted(users))}"
        )
    declared = [i.name for i in config.indexes]
    if index_name is None:
        own = [i.name for i in config.indexes if i.user == user_name]
        if not own:
            raise LookupError(
                f"user {user_name!r} has no index in the config; give --index "
                f"({', '.join(declared) or 'none declared'})"
            )
        index_name = own[0]
    elif index_name not in declared:
        raise LookupError(
            f"index {index_name!r} is not in the config; indexes: {', '.join(declared) or 'none'}"
        )
    return ClientSettings(
        user=user_name,
        password=users[user_name].password,
        index=index_name,
        outside_url=config.server.outside_url,
        ca_pem=ca_pem,
        ca_source=ca_source,
    )


@click.command("client-config")
@config_option
@click.option("--user", "user_name", required=True, help="The devpi user (from the config).")
@click.option("--index", "index_name", help="user/index (default: the user's first index).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pip", "pypirc", "uv", "all"]),
    default="all",
    show_default=True,
    help="Which client's settings.",
)
@click.option(
    "--shell",
    type=click.Choice(["bash", "fish"]),
    default="bash",
    show_default=True,
    help="The shell the output is pasted into.",
)
def client_config(
    config_path: Path, user_name: str, index_name: str | None, fmt: Format, shell: Shell
) -> None:
    """Print the twine, pip and uv settings of one user, ready to paste into a shell."""
    from agent.host.caddy import caddy_home
    from agent.host.tls import internal_root

    config = load_config("client-config", config_path)
    require_root("client-config")
    ca_pem: str | None = None
    ca_source: Path | None = None
    if config.server.tls == "internal":
        ca_source = internal_root(caddy_home())
    elif config.server.tls == "acme" and config.server.acme_ca_root is not None:
        ca_source = config.server.acme_ca_root  # a company's ACME CA: clients trust its root
    if ca_source is not None:
        try:
            ca_pem = ca_source.read_text()
        except OSError as error:
            fail(
                "client-config",
                f"cannot read the CA clients must trust, {ca_source} ({error.strerror}); "
                'with tls = "internal" Caddy creates it on its first start: run '
                "`devpi-agent apply` first",
                EXIT_FAILED,
            )
    try:
        settings = settings_for(config, user_name, index_name, ca_pem, ca_source)
    except LookupError as error:
        fail("client-config", str(error.args[0]), EXIT_CONFIG)
    click.echo(render(settings, fmt, shell), nl=False)
