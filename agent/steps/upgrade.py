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
from agent.core.paths import DEVPI_RESTART, UPGRADE_RECORD, VENV_BUILD
from agent.core.runner import CommandFailed
from agent.host import devpi_swap
from agent.host.devpi_data import (
    export_inventory,
    export_to,
    move,
    remove_tree,
    stop_devpi,
    timestamp,
)
from agent.host.devpi_swap import Swap, import_beside, switch_and_check
from agent.host.supervisor import warm_mirror
from agent.host.venv import ensure_venv, installed_versions

NAME = "devpi-upgrade"
RECORD = UPGRADE_RECORD


@dataclass(frozen=True)
class Migration:
    """Where everything is while an upgrade runs; enough to undo it after a crash."""

    source_version: str
    target_version: str
    old_venv: str
    old_serverdir: str
    new_serverdir: str
    export: str

    def swap(self, serverdir: Path) -> Swap:
        staging = Path(self.new_serverdir)
        # The import's copy, kept in case anything reached it in its seconds of service.
        failed = serverdir.with_name(f"{staging.name}-failed")
        return Swap(serverdir, staging, Path(self.old_serverdir), failed)


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
    record = _record(ctx, installed, wanted)
    swap, export = record.swap(ctx.config.devpi.serverdir), Path(record.export)
    try:
        stop_devpi(ctx)  # no upload may land after the export
        export_to(ctx, export)
        expected = export_inventory(ctx.files.host_path(export))
        _new_venv(ctx, Path(record.old_venv))
        import_beside(ctx, swap, export)
        switch_and_check(ctx, swap, expected, serving=f"devpi {wanted}")
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


def _record(ctx: Context, installed: str, wanted: str) -> Migration:
    """Where everything goes, written down before anything moves."""
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
    return record


def _new_venv(ctx: Context, old_venv: Path) -> None:
    """The old venv aside (for a roll-back), the new one built at the configured path."""
    remove_tree(ctx, old_venv)
    move(ctx, ctx.config.devpi.venv, old_venv)
    ensure_venv(ctx)


def roll_back(ctx: Context, record: Migration) -> None:
    """Old venv and old server directory back in place and running, whatever state it was in."""

    def old_venv_back() -> None:
        devpi, old_venv = ctx.config.devpi, Path(record.old_venv)
        if ctx.files.exists(old_venv):
            remove_tree(ctx, devpi.venv)
            move(ctx, old_venv, devpi.venv)
        ctx.files.remove(RECORD, record=False)  # last: a run killed before this rolls back again
        ctx.clear_pending(VENV_BUILD)

    devpi_swap.roll_back(ctx, record.swap(ctx.config.devpi.serverdir), also=old_venv_back)
