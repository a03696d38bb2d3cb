"""The backup schedule: `devpi-agent backup` by a systemd timer, or by cron where no systemd runs.

The job is the agent itself (one implementation of export, atomic rename and retention, the
same one an operator runs by hand). Under systemd: devpi-agent-backup.service + .timer with
backup.schedule as OnCalendar. Without: /etc/cron.d/devpi-agent-backup, with cron installed
and kept running by supervisord (nothing else would start it). backup.enabled = false removes
the schedule; backups already taken stay. backup.remote installs restic (and ssh for sftp),
whether or not the schedule is on: `devpi-agent backup` and `restore --remote` use it.
"""

from __future__ import annotations

import re
from pathlib import Path

from agent.core.config import DEFAULT_CONFIG_PATH
from agent.core.context import Context, StepFailed
from agent.core.files import render
from agent.core.paths import SUPERVISOR_LOG_DIR, agent_executable
from agent.facts.system import installed_packages
from agent.facts.systemd import unit_properties
from agent.host import apt
from agent.host.supervisor import ensure_program, ensure_running, program_state

NAME = "backup"
UNIT_DIR = Path("/etc/systemd/system")
SERVICE = UNIT_DIR / "devpi-agent-backup.service"
TIMER = UNIT_DIR / "devpi-agent-backup.timer"
CRON_FILE = Path("/etc/cron.d/devpi-agent-backup")
CRON_LOG = Path("/var/log/devpi-agent/backup.log")

_CRON_SHORTHANDS = {
    "hourly": "0 * * * *",
    "daily": "0 0 * * *",
    "weekly": "0 0 * * 1",  # systemd's "weekly" is Monday 00:00
    "monthly": "0 0 1 * *",
}
_TIME_OF_DAY = re.compile(r"^(?:\*-\*-\* )?(?P<hour>\d{1,2}):(?P<minute>\d{2})(?::00)?$")


def cron_schedule(schedule: str) -> str | None:
    """The cron fields for an OnCalendar value, for the ones cron can say; else None."""
    if schedule in _CRON_SHORTHANDS:
        return _CRON_SHORTHANDS[schedule]
    match = _TIME_OF_DAY.fullmatch(schedule)
    if match and int(match["hour"]) < 24 and int(match["minute"]) < 60:
        return f"{int(match['minute'])} {int(match['hour'])} * * *"
    return None


def _variables(ctx: Context) -> dict[str, object]:
    backup = ctx.config.backup
    return {
        "agent": agent_executable(),
        "config": ctx.config.path or DEFAULT_CONFIG_PATH,
        "backup_dir": backup.dir,
        "keep": backup.keep,
        "schedule": backup.schedule,
    }


def remote_packages(ctx: Context) -> list[str]:
    """What backup.remote needs: restic, and ssh for an sftp: remote."""
    remote = ctx.config.backup.remote
    if not remote:
        return []
    return ["restic", "openssh-client"] if remote.startswith("sftp:") else ["restic"]


def converge(ctx: Context) -> None:
    wanted = remote_packages(ctx)
    missing = sorted(set(wanted) - set(installed_packages(ctx.runner, wanted))) if wanted else []
    if missing and ctx.change(f"install {' '.join(missing)} (backup.remote)"):
        apt.install(ctx, missing, timeout=900, progress=f"apt-get install {' '.join(missing)}")
    if not ctx.config.backup.enabled:
        _remove_schedule(ctx)
        return
    devpi = ctx.config.devpi
    ctx.mkdir(
        ctx.config.backup.dir, mode=0o700, owner=devpi.user, group=devpi.user, key="backup.dir"
    )
    if ctx.systemd:
        _systemd_timer(ctx)
    else:
        _cron(ctx)


def _systemd_timer(ctx: Context) -> None:
    variables = _variables(ctx)
    timer = render("devpi-agent-backup.timer.j2", **variables)
    if ctx.files.read(TIMER) != timer and not ctx.check:
        check = ctx.runner.run(
            ["systemd-analyze", "calendar", ctx.config.backup.schedule], check=False, timeout=30
        )
        if not check.ok:
            raise StepFailed(
                f"backup.schedule {ctx.config.backup.schedule!r} is not a systemd calendar "
                f"expression (OnCalendar=):\n{check.tail(3)}"
            )
    changed = ctx.write(SERVICE, render("devpi-agent-backup.service.j2", **variables), mode=0o644)
    changed |= ctx.write(TIMER, timer, mode=0o644)
    if changed and ctx.change("reload systemd units"):
        ctx.runner.run(["systemctl", "daemon-reload"], timeout=120)
    name = TIMER.name
    state = unit_properties(ctx.runner, name, "UnitFileState", "ActiveState")
    enabled, active = state.get("UnitFileState", ""), state.get("ActiveState", "")
    if enabled != "enabled" and ctx.change(f"enable {name}"):
        ctx.runner.run(["systemctl", "enable", name], timeout=60)
    if (active != "active" or changed) and ctx.change(
        f"start {name} (schedule {ctx.config.backup.schedule})"
    ):
        # A restart makes a changed OnCalendar take effect now.
        ctx.runner.run(["systemctl", "restart", name], timeout=60)
    if ctx.files.exists(CRON_FILE) and ctx.change(f"remove {CRON_FILE} (systemd runs the timer)"):
        ctx.files.remove(CRON_FILE)


def _cron(ctx: Context) -> None:
    schedule = cron_schedule(ctx.config.backup.schedule)
    if schedule is None:
        raise StepFailed(
            f"backup.schedule {ctx.config.backup.schedule!r} cannot be expressed for cron (no "
            "systemd here): use hourly, daily, weekly, monthly or HH:MM"
        )
    if "cron" not in installed_packages(ctx.runner, ["cron"]) and ctx.change("install cron"):
        # Held stopped: supervisord runs cron here, a second one started by apt would clash.
        apt.install(ctx, ["cron"], timeout=900, progress="apt-get install cron")
    content = render(
        "devpi-agent-backup.cron.j2", cron_schedule=schedule, log_file=CRON_LOG, **_variables(ctx)
    )
    ctx.write(CRON_FILE, content, mode=0o644)
    program = render("supervisor-cron.conf.j2", log_file=SUPERVISOR_LOG_DIR / "cron.log")
    ensure_program(ctx, "cron", program)
    if program_state(ctx, "cron") not in ("RUNNING", "STARTING"):
        ensure_running(ctx, "cron", restart=False)


def _remove_schedule(ctx: Context) -> None:
    if ctx.systemd and ctx.files.exists(TIMER):
        if ctx.change(f"stop and disable {TIMER.name} (backup.enabled = false)"):
            ctx.runner.run(["systemctl", "disable", "--now", TIMER.name], check=False, timeout=60)
        for path in (TIMER, SERVICE):
            ctx.files.remove(path)
        if ctx.change("reload systemd units"):
            ctx.runner.run(["systemctl", "daemon-reload"], timeout=120)
    if ctx.files.exists(CRON_FILE) and ctx.change(f"remove {CRON_FILE} (backup.enabled = false)"):
        ctx.files.remove(CRON_FILE)
