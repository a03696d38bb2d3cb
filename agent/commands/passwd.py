"""`devpi-agent passwd USER`: a new password in that user's password file.

The next `apply` carries it to devpi and to Caddy's basic auth in one run, after which the old
password works nowhere. Only users with `password_file` qualify: an inline `password =` lives in
the config, which the agent never rewrites.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import click

from agent.commands.support import (
    EXIT_CONFIG,
    EXIT_FAILED,
    config_option,
    fail,
    load_config,
    require_root,
)
from agent.core.config import ConfigError, User, check_password
from agent.core.files import atomic_write
from agent.core.log import redactor

GENERATED_BYTES = 24  # 32 URL-safe characters: well under bcrypt's 72 bytes


def new_password(*, from_stdin: bool, generate: bool) -> str:
    if generate:
        return secrets.token_urlsafe(GENERATED_BYTES)
    if from_stdin:
        line = sys.stdin.readline()
        return line.removesuffix("\n").removesuffix("\r")
    value: str = click.prompt(
        "New password", hide_input=True, confirmation_prompt="Repeat the new password"
    )
    return value


def target_user(users: tuple[User, ...], name: str) -> User:
    """The user whose password file to write; LookupError says why there is none."""
    for user in users:
        if user.name == name:
            if user.password_file is None:
                raise LookupError(
                    f"user {name!r} has an inline `password =` in the config: change it there "
                    "(or switch the user to `password_file =`), then run `devpi-agent apply`"
                )
            return user
    known = ", ".join(sorted(u.name for u in users))
    raise LookupError(f"user {name!r} is not in the config; users: {known}")


def write_password_file(path: Path, password: str) -> None:
    # Root's alone from the first byte (atomic_write sets mode and owner before writing).
    atomic_write(path, (password + "\n").encode(), mode=0o600, owner=None)


@click.command("passwd")
@config_option
@click.argument("user_name", metavar="USER")
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the password from stdin.")
@click.option("--generate", is_flag=True, help="Generate a random password.")
def passwd(config_path: Path, user_name: str, from_stdin: bool, generate: bool) -> None:
    """Write a new password into USER's password file; `apply` then rotates it everywhere."""
    if from_stdin and generate:
        fail("passwd", "give at most one of --stdin and --generate", EXIT_CONFIG)
    config = load_config("passwd", config_path)
    require_root("passwd")
    try:
        user = target_user(config.users, user_name)
    except LookupError as error:
        fail("passwd", str(error.args[0]), EXIT_CONFIG)
    assert user.password_file is not None
    password = new_password(from_stdin=from_stdin, generate=generate)
    try:
        check_password(f"password for {user.name}", password)
    except ConfigError as error:
        fail("passwd", str(error), EXIT_FAILED)
    redactor.add(password, user=user.name)
    if password == user.password:
        fail("passwd", f"that is already {user.name}'s password", EXIT_FAILED)
    write_password_file(user.password_file, password)
    shown = " (generated; read it from the file)" if generate else ""
    click.echo(
        f"wrote a new password for {user.name} to {user.password_file}{shown}; "
        "run `devpi-agent apply` to change it in devpi and Caddy"
    )
