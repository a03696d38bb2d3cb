"""The devpi-agent command line.

Exit codes: 0 success, 1 a step failed, 2 invalid config (nothing touched),
3 could not start (not root, another run holds the lock).

Each command's module is imported only when that command runs: importing all of them (structlog,
jinja2, sh, every step) costs more than the whole of `devpi-agent version`.
"""

from __future__ import annotations

import importlib
import os

import click

from agent import __version__

# command name -> "module:attribute"
LAZY_COMMANDS = {
    "apply": "agent.commands.converge:apply",
    "plan": "agent.commands.converge:plan",
    "verify": "agent.commands.verify:verify",
    "client-config": "agent.commands.client_config:client_config",
    "passwd": "agent.commands.passwd:passwd",
    "backup": "agent.commands.backup:backup",
    "restore": "agent.commands.backup:restore_command",
    "user-data": "agent.commands.userdata:user_data",
    "ca": "agent.commands.ca:ca",
    "metrics": "agent.commands.metrics:metrics",
}


class LazyGroup(click.Group):
    """A click group that imports a command's module the first time the command is looked up."""

    def __init__(self, *args: object, lazy_commands: dict[str, str], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands and cmd_name not in self.commands:
            module_name, attribute = self.lazy_commands[cmd_name].split(":")
            command = getattr(importlib.import_module(module_name), attribute)
            if not isinstance(command, click.Command):
                raise TypeError(f"{self.lazy_commands[cmd_name]} is not a click command")
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=LazyGroup,
    lazy_commands=LAZY_COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option("-v", "--verbose", is_flag=True, help="Also log every command run (debug).")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Converge this host into a private PyPI server: devpi behind Caddy, HTTPS and basic auth."""
    # Files get explicit modes, but what pip and venv create inherits the umask: under a strict
    # one (027, common in hardened cloud-init) the service user could not run its own venv.
    os.umask(0o022)
    ctx.obj = {"verbose": verbose}


@main.command()
def version() -> None:
    """Print the agent's version."""
    click.echo(f"devpi-agent {__version__}")
