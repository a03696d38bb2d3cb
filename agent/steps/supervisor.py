"""supervisord keeps devpi-server running; this step makes sure it is up and serving /+api.

Under systemd, the supervisor unit runs supervisord; in a container without an init system, the
agent starts supervisord itself. supervisorctl needs a running supervisord, so that comes first.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from agent.core import direct_http
from agent.core.context import Context, StepFailed
from agent.core.crashpoint import crashpoint
from agent.core.files import render
from agent.core.runner import Result
from agent.facts import supervisor as supervisor_rpc
from agent.host import replication
from agent.steps.devpi_config import CONFIG_FILE

NAME = "supervisor"
SUPERVISORD_CONF = Path("/etc/supervisor/supervisord.conf")
PROGRAMS_DIR = Path("/etc/supervisor/conf.d")
LOG_DIR = Path("/var/log/supervisor")
DEVPI_PROGRAM = "devpi-server"
READY_TIMEOUT = 180.0
RESTART_PENDING = "devpi-server-restart"


def supervisorctl(ctx: Context, *args: str, check: bool = True, timeout: float = 120) -> Result:
    return ctx.runner.run(
        ["supervisorctl", "-c", str(SUPERVISORD_CONF), *args], check=check, timeout=timeout
    )


def program_state(ctx: Context, program: str) -> str | None:
    """RUNNING, STARTING, BACKOFF, FATAL, STOPPED...; None when supervisord does not know it."""
    return supervisor_rpc.process_state(ctx.files.host_path(SUPERVISORD_CONF), program)


def supervisord_answers(ctx: Context) -> bool:
    return supervisor_rpc.supervisord_pid(ctx.files.host_path(SUPERVISORD_CONF)) is not None


def ensure_supervisord(ctx: Context) -> None:
    if ctx.systemd:
        enabled = ctx.runner.run(["systemctl", "is-enabled", "supervisor"], check=False)
        active = ctx.runner.run(["systemctl", "is-active", "supervisor"], check=False)
        if not (
            enabled.stdout.strip() == "enabled" and active.stdout.strip() == "active"
        ) and ctx.change("enable and start supervisor.service"):
            ctx.runner.run(["systemctl", "enable", "--now", "supervisor"], timeout=120)
    elif not supervisord_answers(ctx) and ctx.change("start supervisord (no init system runs it)"):
        ctx.runner.run(["supervisord", "-c", str(SUPERVISORD_CONF)], timeout=60)
    if not ctx.check:
        _poll(lambda: supervisord_answers(ctx), 30, "supervisord did not come up within 30 s")


def ensure_program(ctx: Context, program: str, content: str) -> bool:
    """Install a program definition and have supervisord pick it up; True if anything changed."""
    path = PROGRAMS_DIR / f"{program}.conf"
    update_pending = f"supervisor-update-{program}"
    if ctx.files.read(path) != content:
        # Marked before the write: a run killed before `update` must still do it next time,
        # or supervisord would keep running the old definition.
        ctx.mark_pending(update_pending)
    changed = ctx.write(path, content, mode=0o644)
    crashpoint(f"supervisor:{program}-written")
    known = program_state(ctx, program) is not None if not ctx.check else not changed
    if (changed or not known or ctx.is_pending(update_pending)) and not ctx.check:
        supervisorctl(ctx, "reread")
        # `update` starts new programs and restarts those whose definition changed.
        supervisorctl(ctx, "update", program)
        ctx.clear_pending(update_pending)
        return True
    return changed


def ensure_running(ctx: Context, program: str, *, restart: bool) -> bool:
    """Start or restart the program as needed; True if it was (re)started."""
    state = program_state(ctx, program) if not ctx.check else None
    if restart:
        if ctx.change(f"restart {program}"):
            supervisorctl(ctx, "restart", program, check=False)
            return True
    elif (
        state not in ("RUNNING", "STARTING")
        and not ctx.check
        and ctx.change(f"start {program} (was {state})")
    ):
        supervisorctl(ctx, "start", program, check=False)
        return True
    return False


def devpi_api_answers(port: int) -> bool:
    try:
        with direct_http.urlopen(f"http://127.0.0.1:{port}/+api", timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _poll(ready: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.1
    while not ready():
        if time.monotonic() > deadline:
            raise StepFailed(message)
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def wait_for_devpi(ctx: Context) -> None:
    port = ctx.config.devpi.port
    deadline = time.monotonic() + READY_TIMEOUT
    delay = 0.1
    while not devpi_api_answers(port):
        state = program_state(ctx, DEVPI_PROGRAM)
        if state in {"FATAL", "BACKOFF", "EXITED", "STOPPED"} or time.monotonic() > deadline:
            raise StepFailed(
                f"devpi-server is {state} and http://127.0.0.1:{port}/+api does not answer; "
                f"last lines of {LOG_DIR / 'devpi-server.log'}:\n{_log_tail(ctx)}"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def _log_tail(ctx: Context, lines: int = 20) -> str:
    text = ctx.files.read(LOG_DIR / "devpi-server.log") or "(empty)"
    return "\n".join(text.splitlines()[-lines:])


def program_content(ctx: Context) -> str:
    devpi = ctx.config.devpi
    return render(
        "supervisor-devpi-server.conf.j2",
        venv=devpi.venv,
        config_file=CONFIG_FILE,
        home=devpi.home,
        user=devpi.user,
        ca_bundle=replication.ca_bundle(ctx.config),
        log_file=LOG_DIR / "devpi-server.log",
    )


def warm_mirror(ctx: Context, timeout: float = 90) -> None:
    """With `devpi.mirror_project_list`, devpi's first PyPI lookup after a start loads ~930k
    project names (10-14 s) and answers 404 meanwhile; take that hit here rather than in a
    user's first pip install. Without it (the default) there is no list and nothing to wait for.
    """
    if not ctx.config.devpi.mirror_project_list:
        return
    url = f"http://127.0.0.1:{ctx.config.devpi.port}/root/pypi/+simple/pip/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with direct_http.urlopen(url, timeout=60) as response:
                if response.status == 200:
                    ctx.log.info("mirror ready", url=url)
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    # Not fatal: a host may have no route to PyPI and serve private packages only.
    ctx.log.warning("mirror not answering yet", url=url, waited=timeout)


def converge(ctx: Context) -> None:
    ensure_supervisord(ctx)
    updated = ensure_program(ctx, DEVPI_PROGRAM, program_content(ctx))
    restart = ctx.is_pending(RESTART_PENDING) and not updated
    started = ensure_running(ctx, DEVPI_PROGRAM, restart=restart) or updated
    if ctx.check:
        return
    crashpoint("supervisor:before-ready")
    wait_for_devpi(ctx)
    ctx.clear_pending(RESTART_PENDING)
    # A replica's mirror and users come from the primary: nothing to warm; the caddy step waits
    # for its first pull.
    if started and not replication.is_replica(ctx.config):
        warm_mirror(ctx)
