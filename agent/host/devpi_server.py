"""devpi-server's own tools, run the one way they are run, and root's password file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from agent.core.config import ConfigError, read_password_file
from agent.core.context import Context, StepFailed
from agent.core.log import redactor
from agent.core.paths import DEVPI_CONFIG_FILE
from agent.core.runner import Result


def run_devpi_tool(
    ctx: Context,
    tool: str,
    *args: str,
    serverdir: Path | None = None,
    venv: Path | None = None,
    wrapper: Sequence[str] = (),
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float,
    progress: str | None = None,
) -> Result:
    """devpi-init, -import, -export or -passwd of `venv` (default: the configured one) with the
    server's config file, as the service user, which owns the data they read and write."""
    devpi = ctx.config.devpi
    argv = [*wrapper, str((venv or devpi.venv) / "bin" / tool)]
    argv += ["--configfile", str(DEVPI_CONFIG_FILE)]
    if serverdir is not None:
        argv += ["--serverdir", str(serverdir)]
    return ctx.runner.run(
        [*argv, *args],
        input=input,
        env=env,
        user=devpi.user,
        cwd=str(devpi.home),
        timeout=timeout,
        progress=progress,
    )


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
