"""The unprivileged system user devpi-server runs as, with its own home."""

from __future__ import annotations

import pwd

from agent.core.context import Context, StepFailed
from agent.host.venv import builds_beside_earlier_steps

NAME = "service-user"


def can_start_early(ctx: Context) -> bool:
    """On a first build, beside apt (core/engine.py): devpi-init, early too, runs as it."""
    return builds_beside_earlier_steps(ctx)


def converge(ctx: Context) -> None:
    devpi = ctx.config.devpi
    try:
        entry = pwd.getpwnam(devpi.user)
    except KeyError:
        entry = None
    if entry is None:
        if ctx.change(f"create system user {devpi.user}", home=str(devpi.home)):
            ctx.runner.run(
                [
                    "useradd",
                    "--system",
                    "--user-group",
                    "--home-dir",
                    str(devpi.home),
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--comment",
                    "devpi-server (managed by devpi-agent)",
                    devpi.user,
                ],
                timeout=60,
            )
    elif entry.pw_uid == 0 or entry.pw_uid >= 1000:
        raise StepFailed(
            f"user {devpi.user} exists but is not a system user (uid {entry.pw_uid}); "
            "pick another devpi.user"
        )
    elif entry.pw_dir != str(devpi.home):
        raise StepFailed(
            f"user {devpi.user} exists with home {entry.pw_dir}, not {devpi.home}; "
            "set devpi.home to match or pick another devpi.user"
        )
    # devpi refuses a secret file in a group- or world-writable directory; keep the home 0750.
    ctx.mkdir(devpi.home, mode=0o750, owner=devpi.user, group=devpi.user, key="devpi.home")
