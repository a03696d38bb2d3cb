"""What the day-2 commands (verify, client-config, passwd, backup, restore) share with `apply`:
the --config option, loading the config or exiting 2, refusing to run without root (exit 3),
and a Context for reusing the steps' looks.

Kept apart from agent.commands.cli, which imports these commands at its end.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import click

from agent.core.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load
from agent.core.context import Context
from agent.core.files import Files
from agent.core.log import redactor
from agent.core.runner import ShRunner
from agent.facts.system import os_release, systemd_running

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_CANNOT_START = 0, 1, 2, 3

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_CONFIG_PATH,
    show_default=True,
    help="The agent's TOML config.",
)


def fail(command: str, message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"devpi-agent {command}: {redactor(message)}", err=True)
    sys.exit(code)


def load_config(command: str, path: Path) -> Config:
    """The validated config with its passwords registered for redaction, or exit 2."""
    try:
        config = load(path)
    except ConfigError as error:
        fail(command, f"invalid config: {error}", EXIT_CONFIG)
    for user in config.users:
        redactor.add(user.password, user=user.name)
    # The remote's keys (backup.remote_env_file) are never logged either.
    redactor.add_all(value for _, value in config.backup.remote_env)
    return config


def require_root(command: str) -> None:
    if os.geteuid() != 0:
        fail(command, f"must run as root (try: sudo devpi-agent {command})", EXIT_CANNOT_START)


def host_context(config: Config, *, check: bool = False) -> Context:
    return Context(
        config=config,
        runner=ShRunner(),
        files=Files(check=check),
        os=os_release(),
        systemd=systemd_running(),
        check=check,
    )
