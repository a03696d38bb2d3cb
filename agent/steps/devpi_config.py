"""devpi-server's own config file, rendered from units/devpi-server.yml.j2."""

from __future__ import annotations

from agent.core.context import Context
from agent.core.crashpoint import crashpoint
from agent.core.files import render
from agent.core.paths import DEVPI_CONFIG_DIR, DEVPI_CONFIG_FILE, DEVPI_RESTART
from agent.host import replication
from agent.host.venv import builds_beside_earlier_steps

NAME = "devpi-config"


def can_start_early(ctx: Context) -> bool:
    """On a first build, beside apt (core/engine.py): devpi-init, early too, reads it."""
    return builds_beside_earlier_steps(ctx)


def content(ctx: Context) -> str:
    devpi = ctx.config.devpi
    return render(
        "devpi-server.yml.j2",
        serverdir=devpi.serverdir,
        secretfile=devpi.secretfile,
        port=devpi.port,
        outside_url=ctx.config.server.outside_url,
        indexer=devpi.indexer,
        argon2=devpi.argon2_cost,
        role=devpi.role,
        primary_url=replication.primary_proxy_url(ctx.config),
    )


def converge(ctx: Context) -> None:
    ctx.mkdir(DEVPI_CONFIG_DIR, mode=0o755)
    wanted = content(ctx)
    if ctx.files.read(DEVPI_CONFIG_FILE) != wanted:
        # Marked before the write: a run killed between the two still restarts devpi next time.
        ctx.mark_pending(DEVPI_RESTART)
    ctx.write(DEVPI_CONFIG_FILE, wanted, mode=0o644)
    crashpoint("devpi-config:written")
    replication.converge_ca_bundle(ctx)
