"""devpi-server's own credentials as the agent keeps them: root's password file."""

from __future__ import annotations

from agent.core.config import ConfigError, read_password_file
from agent.core.context import Context, StepFailed
from agent.core.log import redactor


def root_password(ctx: Context) -> str | None:
    """The devpi root password from its file; None if it does not exist yet."""
    path = ctx.config.devpi.root_password_file
    if not ctx.files.exists(path):
        return None
    try:
        password = read_password_file("devpi.root_password_file", ctx.files.host_path(path))
    except ConfigError as error:
        raise StepFailed(str(error)) from None
    redactor.add(password, user="root")
    return password
