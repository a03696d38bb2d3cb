"""The unprivileged system user devpi-server runs as, with its own home."""

from __future__ import annotations

import grp
import pwd
from pathlib import Path

from agent.core.context import Context, StepFailed
from agent.host.venv import builds_beside_earlier_steps

NAME = "service-user"

SHADOW = Path("/etc/shadow")
GSHADOW = Path("/etc/gshadow")
# useradd's --comment: marks a user as one the agent made.
COMMENT = "devpi-server (managed by devpi-agent)"


def can_start_early(ctx: Context) -> bool:
    """On a first build, beside apt (core/engine.py): devpi-init, early too, runs as it."""
    return builds_beside_earlier_steps(ctx)


def converge(ctx: Context) -> None:
    devpi = ctx.config.devpi
    entry = _user(devpi.user)
    if entry is None:
        if ctx.change(f"create system user {devpi.user}", home=str(devpi.home)):
            _useradd(ctx)
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
    else:
        _redo_a_useradd_cut_short(ctx, entry)
    # devpi refuses a secret file in a group- or world-writable directory; keep the home 0750.
    ctx.mkdir(devpi.home, mode=0o750, owner=devpi.user, group=devpi.user, key="devpi.home")


def _useradd(ctx: Context) -> None:
    devpi = ctx.config.devpi
    # A group of that name left alone by someone else: the user joins it, as useradd
    # --user-group refuses to.
    group = ["--gid", devpi.user] if _group(devpi.user) is not None else ["--user-group"]
    ctx.runner.run(
        [
            "useradd",
            "--system",
            *group,
            "--home-dir",
            str(devpi.home),
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            COMMENT,
            devpi.user,
        ],
        timeout=60,
    )


def _redo_a_useradd_cut_short(ctx: Context, entry: pwd.struct_passwd) -> None:
    """useradd writes /etc/passwd, then /etc/shadow, then /etc/group and /etc/gshadow (shadow's
    close_files): killed in between, it leaves a user without its group or a shadow entry.
    Such a user of ours is removed (userdel takes the parts that are there) and made again, so
    the host ends as an uninterrupted useradd leaves it. The stale lock files are no obstacle:
    shadow's tools remove a lock whose PID is gone."""
    user = entry.pw_name
    missing = [] if _group(user) is not None else [f"group {user}"]
    for database in (SHADOW, GSHADOW):
        text = ctx.files.read(database)
        if text is not None and not any(line.startswith(f"{user}:") for line in text.splitlines()):
            missing.append(f"entry in {database}")
    if not missing:
        return
    if entry.pw_gecos != COMMENT:
        raise StepFailed(
            f"user {user} exists without its {' or '.join(missing)}, and devpi-agent did not "
            "make it; repair it (pwck, grpck) or pick another devpi.user"
        )
    if ctx.change(
        f"make system user {user} again: a useradd was cut short (no {', '.join(missing)})"
    ):
        ctx.runner.run(["userdel", user], timeout=60)
        _useradd(ctx)


def _user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _group(name: str) -> grp.struct_group | None:
    try:
        return grp.getgrnam(name)
    except KeyError:
        return None
