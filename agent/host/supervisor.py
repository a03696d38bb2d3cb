"""supervisord and its programs: make sure it runs, install a program, start or restart it, and
wait until devpi-server answers.

Under systemd the supervisor unit runs supervisord; on a host without an init system the agent
starts supervisord itself. supervisorctl needs a running supervisord, so that comes first.
"""

from __future__ import annotations

import urllib.error

from agent.core import direct_http
from agent.core.context import Context, StepFailed
from agent.core.crashpoint import crashpoint
from agent.core.paths import (
    DEVPI_LOG,
    DEVPI_PROGRAM,
    SUPERVISOR_PROGRAMS_DIR,
    SUPERVISORD_CONF,
)
from agent.core.polling import wait_until
from agent.core.runner import Result
from agent.facts import supervisor as supervisor_rpc
from agent.facts.systemd import unit_state

READY_TIMEOUT = 180.0
# States in which supervisord will not bring a program up by itself.
DOWN = frozenset({"FATAL", "BACKOFF", "EXITED", "STOPPED"})


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
        if not unit_state(ctx.runner, "supervisor").running_and_enabled and ctx.change(
            "enable and start supervisor.service"
        ):
            ctx.runner.run(["systemctl", "enable", "--now", "supervisor"], timeout=120)
    elif not supervisord_answers(ctx) and ctx.change("start supervisord (no init system runs it)"):
        ctx.runner.run(["supervisord", "-c", str(SUPERVISORD_CONF)], timeout=60)
    if not ctx.check and not wait_until(lambda: supervisord_answers(ctx), 30):
        raise StepFailed("supervisord did not come up within 30 s")


def ensure_program(ctx: Context, program: str, content: str) -> bool:
    """Install a program definition and have supervisord pick it up; True if anything changed."""
    path = SUPERVISOR_PROGRAMS_DIR / f"{program}.conf"
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
    """Start or restart the program as needed; True if it was (re)started. `plan` reports a
    stopped program too (supervisord answers read-only questions in check mode as well)."""
    if restart:
        if ctx.change(f"restart {program}"):
            supervisorctl(ctx, "restart", program, check=False)
            return True
        return False
    state = program_state(ctx, program)
    if state in ("RUNNING", "STARTING"):
        return False
    if ctx.check and state is None:
        # Not installed yet (ensure_program would add it, and `update` start it).
        return False
    if ctx.change(f"start {program} (was {state})"):
        supervisorctl(ctx, "start", program, check=False)
        return True
    return False


def devpi_api_answers(port: int) -> bool:
    try:
        with direct_http.urlopen(f"http://127.0.0.1:{port}/+api", timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_for_devpi(ctx: Context) -> None:
    """Until devpi-server answers /+api; fails at once when supervisord gave up on it."""
    port = ctx.config.devpi.port
    state: list[str | None] = [None]

    def answers_or_down() -> bool:
        if devpi_api_answers(port):
            return True
        state[0] = program_state(ctx, DEVPI_PROGRAM)
        return state[0] in DOWN

    if not wait_until(answers_or_down, READY_TIMEOUT) or not devpi_api_answers(port):
        raise StepFailed(
            f"devpi-server is {state[0]} and http://127.0.0.1:{port}/+api does not answer; "
            f"last lines of {DEVPI_LOG}:\n{devpi_log_tail(ctx)}"
        )


def devpi_log_tail(ctx: Context, lines: int = 20) -> str:
    text = ctx.files.read(DEVPI_LOG) or "(empty)"
    return "\n".join(text.splitlines()[-lines:])


def warm_mirror(ctx: Context, timeout: float = 90) -> None:
    """With `devpi.mirror_project_list`, devpi's first PyPI lookup after a start loads ~930k
    project names (10-14 s) and answers 404 meanwhile; take that hit here rather than in a
    user's first pip install. Without it (the default) there is no list and nothing to wait for.
    """
    if not ctx.config.devpi.mirror_project_list:
        return
    url = f"http://127.0.0.1:{ctx.config.devpi.port}/root/pypi/+simple/pip/"

    def answers() -> bool:
        try:
            with direct_http.urlopen(url, timeout=60) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    if wait_until(answers, timeout, first=1.0, most=1.0):
        ctx.log.info("mirror ready", url=url)
    else:
        # Not fatal: a host may have no route to PyPI and serve private packages only.
        ctx.log.warning("mirror not answering yet", url=url, waited=timeout)
