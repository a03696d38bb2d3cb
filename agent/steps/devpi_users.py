"""devpi users and indexes, and the PyPI mirror root/pypi, through devpi's HTTP API (no password
ever in argv).

Missing users and indexes are created, a password that no longer logs in is set, bases that
differ are updated. Nothing is deleted unless `devpi.prune` is true; then users and indexes the
config does not declare are deleted (root and root's indexes never). The root login happens only
when something must change.

A user's password is checked by logging in (how the agent notices a password changed in devpi
behind its back); the logins run side by side, and a no-op run skips those a memo confirms
against devpi's unchanged database (host/login_memo.py).
"""

from __future__ import annotations

from collections.abc import Callable

from agent.core.context import Context, StepFailed
from agent.core.crashpoint import crashpoint
from agent.host import replication
from agent.host.devpi_api import DevpiApi, DevpiError, RemoteUser
from agent.host.devpi_server import root_password
from agent.host.login_memo import LoginMemo
from agent.host.supervisor import devpi_api_answers

NAME = "devpi-users"
# devpi's waitress serves 50 threads; its argon2 check releases the GIL.
MAX_CONCURRENT_LOGINS = 8

PYPI_MIRROR = ("root", "pypi")


def converge(ctx: Context) -> None:
    if replication.is_replica(ctx.config):
        # Checked once the replica has synced (the caddy step, which brings up its way to the
        # primary): declared ones the primary lacks are named there.
        ctx.log.info(
            "replica: users and indexes come from the primary", primary=ctx.config.devpi.primary_url
        )
        return
    if ctx.check and not _reachable(ctx):
        ctx.change(f"create the PyPI mirror {'/'.join(PYPI_MIRROR)} (devpi is not running yet)")
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


def _passwords_that_log_in(
    ctx: Context, api: DevpiApi, remote: dict[str, RemoteUser], memo: LoginMemo
) -> dict[str, bool]:
    """For each configured user devpi has: does the configured password log in? Those the memo
    confirms are not asked; the others are asked side by side."""
    existing = [user for user in ctx.config.users if user.name in remote]
    matches = {u.name: True for u in existing if memo.confirmed(u.name, u.password)}
    unconfirmed = [user for user in existing if user.name not in matches]
    if len(unconfirmed) == 1:
        user = unconfirmed[0]
        matches[user.name] = api.password_matches(user.name, user.password)
    elif unconfirmed:
        from concurrent.futures import ThreadPoolExecutor  # only here: a no-op needs no pool

        workers = min(MAX_CONCURRENT_LOGINS, len(unconfirmed))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            answers = pool.map(lambda u: api.password_matches(u.name, u.password), unconfirmed)
            matches.update(zip((u.name for u in unconfirmed), answers, strict=True))
    return matches


def _converge(ctx: Context, api: DevpiApi) -> None:
    remote = api.users()
    memo = LoginMemo(ctx, api.uuid, api.serial)
    logged_in = False
    changes_before = len(ctx.changes)

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

    _converge_mirror(ctx, api, remote, as_root)

    logs_in = _passwords_that_log_in(ctx, api, remote, memo)
    for user in ctx.config.users:
        if user.name not in remote:
            if ctx.change(f"create devpi user {user.name}"):
                as_root()
                api.create_user(user.name, user.password)
                crashpoint("devpi-users:changed")
        elif not logs_in[user.name] and ctx.change(f"set the password of devpi user {user.name}"):
            as_root()
            api.set_password(user.name, user.password)
            crashpoint("devpi-users:changed")

    for index in ctx.config.indexes:
        existing = remote.get(index.user)
        current = existing.indexes.get(index.index) if existing else None
        if current is None:
            if ctx.change(f"create index {index.name} bases={','.join(index.bases)}"):
                as_root()
                api.create_index(index.user, index.index, index.bases)
                crashpoint("devpi-users:changed")
        elif current.bases != index.bases:
            described = f"{','.join(current.bases)} -> {','.join(index.bases)}"
            if ctx.change(f"set bases of {index.name}: {described}"):
                as_root()
                api.set_bases(index.user, index.index, index.bases)
                crashpoint("devpi-users:changed")

    if ctx.config.devpi.prune:
        _prune(ctx, api, remote, as_root)

    if len(ctx.changes) == changes_before:
        # Nothing changed in devpi: every configured user exists and logs in, as of the serial
        # read before the logins.
        memo.save({user.name: user.password for user in ctx.config.users})


def _converge_mirror(
    ctx: Context, api: DevpiApi, remote: dict[str, RemoteUser], as_root: Callable[[], None]
) -> None:
    """root/pypi, which devpi-init is told not to make: made here with mirror_no_project_list
    set from its first moment, since devpi fetches (and Whoosh indexes) PyPI's whole project
    list as soon as a mirror without it exists. Earlier hosts' root/pypi gets the option set."""
    user, index = PYPI_MIRROR
    no_project_list = not ctx.config.devpi.mirror_project_list
    owner = remote.get(user)
    current = owner.indexes.get(index) if owner else None
    if current is None:
        wanted = f"project list: {'off' if no_project_list else 'on'}"
        if ctx.change(f"create the PyPI mirror {user}/{index} ({wanted})"):
            as_root()
            api.create_pypi_mirror(user, index, no_project_list=no_project_list)
            crashpoint("devpi-users:changed")
    elif (
        current.type == "mirror"
        and current.no_project_list != no_project_list
        and ctx.change(f"set mirror_no_project_list={no_project_list} on {user}/{index}")
    ):
        as_root()
        api.set_no_project_list(user, index, no_project_list)
        crashpoint("devpi-users:changed")


def prune_plan(ctx: Context, remote: dict[str, RemoteUser]) -> tuple[list[str], list[str]]:
    """(indexes, users) to delete: what devpi has and the config does not declare, root's never.

    Indexes come in an order where none is deleted before an index that still uses it as a base.
    """
    declared_users = {user.name for user in ctx.config.users}
    declared_indexes = {index.name for index in ctx.config.indexes}
    users = sorted(name for name in remote if name != "root" and name not in declared_users)
    doomed = {
        index.name: index
        for user in remote.values()
        if user.name != "root"
        for index in user.indexes.values()
        if index.name not in declared_indexes
    }
    ordered: list[str] = []
    while doomed:
        used_as_base = {base for index in doomed.values() for base in index.bases}
        ready = sorted(name for name in doomed if name not in used_as_base) or sorted(doomed)
        for name in ready:
            ordered.append(name)
            del doomed[name]
    return ordered, users


def _prune(
    ctx: Context, api: DevpiApi, remote: dict[str, RemoteUser], as_root: Callable[[], None]
) -> None:
    indexes, users = prune_plan(ctx, remote)
    for name in indexes:
        if ctx.change(f"delete index {name} and its uploads (devpi.prune = true)"):
            as_root()
            user, index = name.split("/")
            api.delete_index(user, index)
    for name in users:
        if ctx.change(f"delete devpi user {name} (devpi.prune = true)"):
            as_root()
            api.delete_user(name)
