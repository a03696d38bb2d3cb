"""devpi's one-time set-up: the root password, the signing secret, and the server directory.

devpi-init refuses to run twice (it checks <serverdir>/.nodeinfo), so it is guarded; it runs into
a temporary directory that is renamed into place, so a run killed mid-init leaves no half-made
server directory behind. Both commands run as the service user, whose files they create.
"""

from __future__ import annotations

import secrets
import shutil

from agent.core.context import Context, StepFailed
from agent.core.crashpoint import crashpoint
from agent.core.log import redactor
from agent.core.paths import AGENT_ETC, DEVPI_RESTART
from agent.host import replication
from agent.host.devpi_server import root_password, run_devpi_tool
from agent.host.venv import builds_beside_earlier_steps

NAME = "devpi-init"


def can_start_early(ctx: Context) -> bool:
    """On a first build, beside apt (core/engine.py), after the venv, the service user and
    devpi's config, which are early steps too (one after another, in order)."""
    return builds_beside_earlier_steps(ctx)


def ensure_root_password(ctx: Context) -> str:
    password = root_password(ctx)
    if password is None:
        password = secrets.token_urlsafe(32)
        redactor.add(password, user="root")
        path = ctx.config.devpi.root_password_file
        ctx.mkparent(path, mode=0o700)
        ctx.write(path, password + "\n", mode=0o600, secret=True)
    return password


def converge(ctx: Context) -> None:
    devpi = ctx.config.devpi
    # The agent's own directory, whoever made it (cloud-init, an operator's mkdir): it holds
    # the config and root's password, so it is root's alone.
    ctx.mkdir(AGENT_ETC, mode=0o700)
    # A replica's root, like every user, comes from the primary: it has no password of its own.
    password = None if replication.is_replica(ctx.config) else ensure_root_password(ctx)
    crashpoint("devpi-init:password-written")
    bin_dir = devpi.venv / "bin"

    replication.converge_secret(ctx)
    if not ctx.files.exists(devpi.secretfile) and ctx.change(
        f"generate devpi's secret {devpi.secretfile}"
    ):
        ctx.runner.run(
            [str(bin_dir / "devpi-gen-secret"), "--secretfile", str(devpi.secretfile)],
            user=devpi.user,
            cwd=str(devpi.home),
            timeout=120,
        )

    replication.check_server_dir_role(ctx)
    if ctx.files.exists(devpi.serverdir / ".nodeinfo"):
        return
    real_serverdir = ctx.files.host_path(devpi.serverdir)
    if real_serverdir.exists() and any(real_serverdir.iterdir()):
        raise StepFailed(
            f"{devpi.serverdir} holds files but no .nodeinfo, so it is not a devpi server "
            "directory; move it away (the agent never deletes data)"
        )
    staging = devpi.serverdir.with_name(devpi.serverdir.name + ".init")
    if ctx.change(f"initialise devpi's server directory {devpi.serverdir}"):
        real_staging = ctx.files.host_path(staging)
        if real_staging.exists():
            shutil.rmtree(real_staging)
        if real_serverdir.exists():
            real_serverdir.rmdir()
        run_devpi_tool(
            ctx,
            "devpi-init",
            # devpi-users makes root/pypi, with the mirror options devpi-init cannot set.
            *([] if replication.is_replica(ctx.config) else ["--no-root-pypi"]),
            serverdir=staging,
            # The environment keeps the password out of argv (and so out of ps).
            # A replica's devpi-init makes an empty server dir that follows the primary.
            env={"DEVPISERVER_ROOT_PASSWD": password} if password is not None else {},
            timeout=600,
        )
        if not (real_staging / ".nodeinfo").exists():
            raise StepFailed(f"devpi-init finished but {staging}/.nodeinfo is missing")
        ctx.mark_pending(DEVPI_RESTART)
        real_staging.rename(real_serverdir)
