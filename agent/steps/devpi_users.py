"""devpi users and indexes through devpi's HTTP API (no password ever in argv).

Missing users and indexes are created, a password that no longer logs in is set, bases that
differ are updated. Nothing is deleted. The root login happens only when something must change.
"""

from __future__ import annotations

from agent.devpi_api import DevpiApi, DevpiError
from agent.steps.base import Context, StepFailed
from agent.steps.devpi_init import root_password
from agent.steps.supervisor import devpi_api_answers

NAME = "devpi-users"


def converge(ctx: Context) -> None:
    if ctx.check and not _reachable(ctx):
        for user in ctx.config.users:
            ctx.change(f"create devpi user {user.name} (devpi is not running yet)")
        for index in ctx.config.indexes:
            ctx.change(f"create index {index.name} bases={','.join(index.bases)}")
        return
    api = DevpiApi(ctx.config.devpi.port)
    try:
        _converge(ctx, api)
    except DevpiError as error:
        raise StepFailed(str(error)) from None


def _reachable(ctx: Context) -> bool:
    return devpi_api_answers(ctx.config.devpi.port)


def _converge(ctx: Context, api: DevpiApi) -> None:
    remote = api.users()
    logged_in = False

    def as_root() -> None:
        nonlocal logged_in
        if logged_in or ctx.check:
            return
        password = root_password(ctx)
        if password is None or not api.login("root", password):
            raise StepFailed(
                f"devpi refuses the root password in {ctx.config.devpi.root_password_file}; "
                "it must be the one devpi was initialised with"
            )
        logged_in = True

    for user in ctx.config.users:
        if user.name not in remote:
            if ctx.change(f"create devpi user {user.name}"):
                as_root()
                api.create_user(user.name, user.password)
        elif not api.password_matches(user.name, user.password) and ctx.change(
            f"set the password of devpi user {user.name}"
        ):
            as_root()
            api.set_password(user.name, user.password)

    for index in ctx.config.indexes:
        existing = remote.get(index.user)
        current = existing.indexes.get(index.index) if existing else None
        if current is None:
            if ctx.change(f"create index {index.name} bases={','.join(index.bases)}"):
                as_root()
                api.create_index(index.user, index.index, index.bases)
        elif current.bases != index.bases:
            described = f"{','.join(current.bases)} -> {','.join(index.bases)}"
            if ctx.change(f"set bases of {index.name}: {described}"):
                as_root()
                api.set_bases(index.user, index.index, index.bases)
