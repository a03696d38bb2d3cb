"""The Prometheus exporter: `devpi-agent metrics serve` as the supervisor program
devpi-agent-metrics when metrics.enabled; removed (nothing runs, nothing listens) when not.
"""

from __future__ import annotations

import hashlib
import json

from agent import __version__
from agent.core.config import DEFAULT_CONFIG_PATH
from agent.core.context import Context, StepFailed
from agent.core.files import render
from agent.core.paths import (
    METRICS_PROGRAM,
    SUPERVISOR_LOG_DIR,
    SUPERVISOR_PROGRAMS_DIR,
    agent_executable,
)
from agent.core.polling import wait_until
from agent.host.supervisor import (
    ensure_program,
    ensure_running,
    program_state,
    supervisorctl,
)

NAME = "metrics"
PROGRAM_FILE = SUPERVISOR_PROGRAMS_DIR / f"{METRICS_PROGRAM}.conf"
LOG_FILE = SUPERVISOR_LOG_DIR / f"{METRICS_PROGRAM}.log"


def settings_fingerprint(ctx: Context) -> str:
    """A digest of what the exporter reads from the config at its start (no secret in it), and
    the agent's version: in the program file, so a change makes supervisor restart it."""
    config = ctx.config
    settings = {
        "version": __version__,
        "metrics": [
            config.metrics.listen,
            config.metrics.backup_max_age,
            config.metrics.files_scan_interval,
        ],
        "server": [config.server.domain, config.server.https_port, config.server.caddy_admin],
        "devpi": [config.devpi.port, str(config.devpi.home)],
        "backup": config.backup.enabled,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def program_content(ctx: Context) -> str:
    return render(
        "supervisor-devpi-agent-metrics.conf.j2",
        agent=agent_executable(),
        config=ctx.config.path or DEFAULT_CONFIG_PATH,
        log_file=LOG_FILE,
        fingerprint=settings_fingerprint(ctx),
    )


def converge(ctx: Context) -> None:
    if not ctx.config.metrics.enabled:
        _remove(ctx)
        return
    updated = ensure_program(ctx, METRICS_PROGRAM, program_content(ctx))
    ensure_running(ctx, METRICS_PROGRAM, restart=False)
    if ctx.check or not updated:
        return

    def running() -> bool:
        return program_state(ctx, METRICS_PROGRAM) == "RUNNING"

    if not wait_until(running, 30):
        tail = "\n".join((ctx.files.read(LOG_FILE) or "(empty)").splitlines()[-10:])
        raise StepFailed(
            f"{METRICS_PROGRAM} is {program_state(ctx, METRICS_PROGRAM)}, not RUNNING; "
            f"last lines of {LOG_FILE}:\n{tail}"
        )


def _remove(ctx: Context) -> None:
    if not ctx.files.exists(PROGRAM_FILE):
        return
    if ctx.change(f"remove {METRICS_PROGRAM} (metrics.enabled = false)"):
        ctx.files.remove(PROGRAM_FILE)
        # `update` stops and forgets a program whose definition is gone.
        supervisorctl(ctx, "reread")
        supervisorctl(ctx, "update", METRICS_PROGRAM, check=False)
