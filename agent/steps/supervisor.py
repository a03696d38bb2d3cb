"""supervisord keeps devpi-server running; this step makes sure it is up and serving /+api.

Under systemd, the supervisor unit runs supervisord; in a container without an init system, the
agent starts supervisord itself (host/supervisor.py).
"""

from __future__ import annotations

from agent.core.context import Context
from agent.core.crashpoint import crashpoint
from agent.core.files import render
from agent.core.paths import DEVPI_CONFIG_FILE, DEVPI_LOG, DEVPI_PROGRAM, DEVPI_RESTART
from agent.host import replication
from agent.host.supervisor import (
    ensure_program,
    ensure_running,
    ensure_supervisord,
    wait_for_devpi,
    warm_mirror,
)

NAME = "supervisor"


def program_content(ctx: Context) -> str:
    devpi = ctx.config.devpi
    return render(
        "supervisor-devpi-server.conf.j2",
        venv=devpi.venv,
        config_file=DEVPI_CONFIG_FILE,
        home=devpi.home,
        user=devpi.user,
        ca_bundle=replication.ca_bundle(ctx.config),
        log_file=DEVPI_LOG,
    )


def converge(ctx: Context) -> None:
    ensure_supervisord(ctx)
    updated = ensure_program(ctx, DEVPI_PROGRAM, program_content(ctx))
    restart = ctx.is_pending(DEVPI_RESTART) and not updated
    started = ensure_running(ctx, DEVPI_PROGRAM, restart=restart) or updated
    if ctx.check:
        return
    crashpoint("supervisor:before-ready")
    wait_for_devpi(ctx)
    ctx.clear_pending(DEVPI_RESTART)
    # A replica's mirror and users come from the primary: nothing to warm; the caddy step waits
    # for its first pull.
    if started and not replication.is_replica(ctx.config):
        warm_mirror(ctx)
