"""devpi-server upgrades that need more than new code: export, new venv, import, switch.

Within a major version the `venv` step upgrades in place (new pins, restart). Across major
versions devpi-server may not read the old server directory, so this step, before `venv`:
stops devpi (no upload may land after the export), exports with the old code, moves the old venv
aside, builds the new one at the configured path, imports into a new server directory beside
the old one, switches the directories, starts devpi and checks that every release file of the
export is served with its sha256. If anything fails, the old venv and server directory are put
back and started. `devpi.upgrade = "export-import"` takes this path for every version change.

The old server directory and the export stay (the agent never deletes data); the old venv goes.
A record in the agent's state directory survives a run killed midway, and the next run first
puts the old versions back, then tries again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.core.context import Context, StepFailed
from agent.core.paths import DEVPI_RESTART, STATE_DIR, VENV_BUILD
from agent.core.runner import CommandFailed
from agent.host.devpi_api import DevpiApi
from agent.host.devpi_data import (
    describe_missing,
    export_inventory,
    export_to,
    import_into,
    missing_files,
    move,
    remove_tree,
    served_inventory,
    start_devpi,
    stop_devpi,
    timestamp,
)
from agent.host.supervisor import warm_mirror
from agent.host.venv import ensure_venv, installed_versions

NAME = "devpi-upgrade"
RECORD = STATE_DIR / "upgrade.json"


@dataclass(frozen=True)
class Migration:
    """Where everything is while an upgrade runs; enough to undo it after a crash."""

    source_version: str
    target_version: str
    old_venv: str
    old_serverdir: str
    new_serverdir: str
    export: str


def installed_server_version(ctx: Context) -> str | None:
    venv = ctx.files.host_path(ctx.config.devpi.venv)
    versions = installed_versions(sorted(venv.glob("lib/python3*/site-packages")))
    return versions.get("devpi-server")


def _release(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits or digits != part:
            break
        numbers.append(int(digits))
    return tuple(numbers)


def needs_export_import(installed: str | None, wanted: str, mode: str) -> bool:
    if installed is None or installed == wanted:
        return False
    if mode == "export-import":
        return True
    return _release(installed)[:1] != _release(wanted)[:1]


def converge(ctx: Context) -> None:
    devpi = ctx.config.devpi
    if ctx.files.exists(RECORD) and ctx.change("undo an upgrade that was cut short"):
        record = Migration(**json.loads(ctx.files.read(RECORD) or "{}"))
        roll_back(ctx, record)
    installed = installed_server_version(ctx)
    wanted = devpi.server_version
    if not needs_export_import(installed, wanted, devpi.upgrade):
        return
    assert installed is not None
    if not ctx.files.exists(devpi.serverdir / ".nodeinfo"):
        return  # no data yet: the venv step replaces the code in place
    if devpi.role == "replica":
        # An import makes a server of its own, with a new identity; a replica copies its primary.
        raise StepFailed(
            f"a replica is not upgraded by export and import: upgrade the primary first, then "
            f"move {devpi.serverdir} away and apply; the replica copies everything again"
        )
    if _release(wanted) < _release(installed):
        raise StepFailed(
            f"devpi-server {wanted} is older than the installed {installed}: an export imports "
            "only into the same or a newer version; pin a newer one or restore a backup"
        )
    if ctx.change(f"upgrade devpi-server {installed} -> {wanted} by export and import"):
        migrate(ctx, installed, wanted)


def migrate(ctx: Context, installed: str, wanted: str) -> None:
    devpi = ctx.config.devpi
    stamp = timestamp()
    record = Migration(
        source_version=installed,
        target_version=wanted,
        old_venv=str(devpi.venv.with_name(f"{devpi.venv.name}.previous-{installed}")),
        old_serverdir=str(devpi.serverdir.with_name(f"{devpi.serverdir.name}.{installed}-{stamp}")),
        new_serverdir=str(devpi.serverdir.with_name(f"{devpi.serverdir.name}.upgrade-{stamp}")),
        export=str(devpi.home / f"export-{installed}-{stamp}"),
    )
    ctx.files.ensure_dir(RECORD.parent, mode=0o700, record=False)
    ctx.files.ensure_file(RECORD, json.dumps(asdict(record)) + "\n", mode=0o600, record=False)
    export = Path(record.export)
    try:
        stop_devpi(ctx)
        export_to(ctx, export)
        expected = export_inventory(ctx.files.host_path(export))
        remove_tree(ctx, Path(record.old_venv))
        move(ctx, devpi.venv, Path(record.old_venv))
        ensure_venv(ctx)
        import_into(ctx, Path(record.new_serverdir), export)
        move(ctx, devpi.serverdir, Path(record.old_serverdir))
        move(ctx, Path(record.new_serverdir), devpi.serverdir)
        start_devpi(ctx)
        missing = missing_files(expected, served_inventory(DevpiApi(devpi.port)))
        if missing:
            raise StepFailed(
                f"devpi {wanted} does not serve the export: {describe_missing(missing)}"
            )
    except (StepFailed, CommandFailed, OSError) as error:
        ctx.log.error("upgrade failed, putting the old versions back", error=str(error))
        roll_back(ctx, record)
        raise StepFailed(
            f"upgrading devpi-server {installed} -> {wanted} failed, devpi-server {installed} "
            f"runs again with its data ({record.export} holds the export): {error}"
        ) from None
    remove_tree(ctx, Path(record.old_venv))
    ctx.files.remove(RECORD, record=False)
    ctx.clear_pending(DEVPI_RESTART)
    warm_mirror(ctx)
    ctx.log.info(
        "upgraded by export and import",
        version=wanted,
        files=len(expected),
        previous_serverdir=record.old_serverdir,
        export=record.export,
    )


def roll_back(ctx: Context, record: Migration) -> None:
    """Old venv and old server directory back in place and running, whatever state it was in."""
    devpi = ctx.config.devpi
    stop_devpi(ctx)
    old_venv, old_serverdir = Path(record.old_venv), Path(record.old_serverdir)
    if ctx.files.exists(old_venv):
        remove_tree(ctx, devpi.venv)
        move(ctx, old_venv, devpi.venv)
    if ctx.files.exists(old_serverdir):
        if ctx.files.exists(devpi.serverdir):
            # The import's copy, kept in case anything reached it in its seconds of service.
            failed = devpi.serverdir.with_name(f"{Path(record.new_serverdir).name}-failed")
            move(ctx, devpi.serverdir, failed)
        move(ctx, old_serverdir, devpi.serverdir)
    remove_tree(ctx, Path(record.new_serverdir))
    ctx.files.remove(RECORD, record=False)
    ctx.clear_pending(VENV_BUILD)
    if ctx.files.exists(devpi.serverdir / ".nodeinfo"):
        start_devpi(ctx)
