"""`devpi-agent backup` and `devpi-agent restore DIR`.

backup: devpi-export into <backup.dir>/.<timestamp>.partial, renamed to <backup.dir>/<timestamp>
only once complete (a cut-short backup never looks like a good one), then the oldest beyond
`backup.keep` are deleted. The timer or cron job of the `backup` step runs exactly this.

restore: devpi-import of an export into a new server directory beside the live one, as the
service user; devpi stopped, the root password set to this host's, the directories switched,
devpi started, every release file of the export checked to be served with the same sha256.
Anything failing after the switch puts the previous directory back. The previous directory is
kept (the agent never deletes data). A server that already holds uploads is refused unless
--force.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from agent.commands.support import (
    EXIT_CANNOT_START,
    EXIT_FAILED,
    config_option,
    fail,
    host_context,
    load_config,
    require_root,
)
from agent.core import log
from agent.core.context import Context, StepFailed
from agent.core.engine import LOCK_FILE, LockTimeout, single_run
from agent.core.paths import DEVPI_CONFIG_FILE
from agent.core.runner import CommandFailed
from agent.host.devpi_api import DevpiApi
from agent.host.devpi_data import (
    BACKUP_NAME,
    DATAINDEX,
    check_export_entries,
    describe_missing,
    export_inventory,
    export_to,
    import_into,
    missing_files,
    move,
    readable_by,
    remove_tree,
    served_inventory,
    set_root_password,
    stage_indexes,
    start_devpi,
    stop_devpi,
    timestamp,
)
from agent.host.devpi_server import root_password
from agent.host.supervisor import devpi_api_answers, warm_mirror
from agent.steps import devpi_users


@dataclass
class BackupResult:
    path: Path
    files: int
    bytes: int
    seconds: float
    pruned: list[Path] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "files": self.files,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "pruned": [str(p) for p in self.pruned],
        }


def backups(directory: Path) -> list[Path]:
    """Complete backups in `directory`, oldest first (their names sort by time)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and BACKUP_NAME.fullmatch(p.name))


def prune_backups(directory: Path, keep: int) -> list[Path]:
    """Delete the oldest complete backups beyond `keep`; anything else there is left alone."""
    found = backups(directory)
    doomed = found[: max(0, len(found) - keep)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def _size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def make_backup(ctx: Context) -> BackupResult:
    started = time.monotonic()
    devpi, settings = ctx.config.devpi, ctx.config.backup
    ctx.mkdir(settings.dir, mode=0o700, owner=devpi.user, group=devpi.user, key="backup.dir")
    directory = ctx.files.host_path(settings.dir)
    # Left by a backup that was cut short (the lock says none is running now).
    for stale in directory.glob(".*.partial"):
        shutil.rmtree(stale)
    name = timestamp()
    if ctx.files.exists(settings.dir / name):
        # Names have a resolution of one second; a second backup within it waits for the next.
        time.sleep(1.0)
        name = timestamp()
    final, partial = settings.dir / name, settings.dir / f".{name}.partial"
    if ctx.files.exists(final):
        raise StepFailed(f"{final} exists already")
    try:
        export_to(ctx, partial)
        move(ctx, partial, final)
    finally:
        remove_tree(ctx, partial)
    pruned = prune_backups(directory, settings.keep)
    files, size = _size(ctx.files.host_path(final))
    return BackupResult(final, files, size, time.monotonic() - started, pruned)


@dataclass
class RestoreResult:
    source: Path
    files: int
    previous: Path | None
    seconds: float


def existing_uploads(api: DevpiApi) -> list[str]:
    """ "index: project" for every project uploaded to any index of the running server."""
    found = []
    for name in stage_indexes(api):
        user, index = name.split("/")
        found += [f"{name}: {project}" for project in api.projects(user, index)]
    return found


def restore(ctx: Context, source: Path, *, force: bool) -> RestoreResult:
    started = time.monotonic()
    devpi = ctx.config.devpi
    if devpi.role == "replica":
        raise StepFailed(
            "this host is a replica: restore the backup on its primary; the replicas copy it "
            "(after a restore they start over: docs/scaling.md)"
        )
    if not (source / DATAINDEX).is_file():
        raise StepFailed(f"{source} is not a devpi export: it has no {DATAINDEX}")
    check_export_entries(source)
    for needed in (devpi.venv / "bin" / "devpi-import", DEVPI_CONFIG_FILE):
        if not ctx.files.exists(needed):
            raise StepFailed(f"{needed} is missing: run `devpi-agent apply` on this host first")
    expected = export_inventory(source)
    api = DevpiApi(devpi.port)
    initialised = ctx.files.exists(devpi.serverdir / ".nodeinfo")
    if initialised and not force:
        if not devpi_api_answers(devpi.port):
            raise StepFailed(
                f"devpi is not running, so the agent cannot tell whether {devpi.serverdir} "
                "holds uploads; start it (devpi-agent apply) or restore with --force"
            )
        uploads = existing_uploads(api)
        if uploads:
            shown = ", ".join(uploads[:5]) + (" ..." if len(uploads) > 5 else "")
            raise StepFailed(
                f"this server already holds uploads ({shown}); restoring replaces them: "
                "use --force (the current server directory is kept beside the restored one)"
            )
    password = root_password(ctx)
    if password is None:
        raise StepFailed(f"{devpi.root_password_file} is missing: run `devpi-agent apply` first")

    stamp = timestamp()
    staging = devpi.serverdir.with_name(f"{devpi.serverdir.name}.restore-{stamp}")
    copy: Path | None = None
    if not readable_by(ctx, devpi.user, source / DATAINDEX):
        # devpi-import runs as the service user; an export copied in as root may be closed to it.
        copy = devpi.home / f".restore-source-{stamp}"
        ctx.log.info("copying the export for the service user", source=str(source), to=str(copy))
        # symlinks=True: never follow one, should the export change after the check above.
        shutil.copytree(source, ctx.files.host_path(copy), symlinks=True)
        ctx.runner.run(["chown", "-R", f"{devpi.user}:{devpi.user}", str(copy)], timeout=3600)
    try:
        import_into(ctx, staging, copy or source)
    except BaseException:
        remove_tree(ctx, staging)
        raise
    finally:
        if copy is not None:
            remove_tree(ctx, copy)
    previous: Path | None = None
    stop_devpi(ctx)
    try:
        set_root_password(ctx, staging, password)
        if initialised or ctx.files.exists(devpi.serverdir):
            previous = devpi.serverdir.with_name(f"{devpi.serverdir.name}.before-restore-{stamp}")
            move(ctx, devpi.serverdir, previous)
        move(ctx, staging, devpi.serverdir)
        start_devpi(ctx)
        missing = missing_files(expected, served_inventory(api))
        if missing:
            raise StepFailed(
                f"the restored server does not serve the export: {describe_missing(missing)}"
            )
    except BaseException as error:
        ctx.log.error(
            "restore failed, putting the previous server directory back", error=str(error)
        )
        stop_devpi(ctx)
        if ctx.files.exists(devpi.serverdir) and previous is not None:
            move(
                ctx,
                devpi.serverdir,
                devpi.serverdir.with_name(f"{devpi.serverdir.name}.failed-restore-{stamp}"),
            )
        if previous is not None:
            move(ctx, previous, devpi.serverdir)
        remove_tree(ctx, staging)
        if ctx.files.exists(devpi.serverdir / ".nodeinfo"):
            start_devpi(ctx)
        raise
    # The export's users keep their old passwords: the configured ones are set again.
    devpi_users.converge(ctx)
    warm_mirror(ctx)
    return RestoreResult(source, len(expected), previous, time.monotonic() - started)


@click.command("backup")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--lock-timeout", type=float, default=3600, show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="Also log every command run.")
def backup(config_path: Path, as_json: bool, lock_timeout: float, verbose: bool) -> None:
    """Export devpi now into backup.dir/<timestamp>; keep the newest backup.keep."""
    config = load_config("backup", config_path)
    require_root("backup")
    log.configure(verbose=verbose)
    ctx = host_context(config)
    try:
        with single_run(LOCK_FILE, lock_timeout):
            result = make_backup(ctx)
    except LockTimeout as error:
        fail("backup", str(error), EXIT_CANNOT_START)
    except (StepFailed, CommandFailed, OSError) as error:
        fail("backup", str(error), EXIT_FAILED)
    ctx.log.info("backup", **result.as_json())
    if as_json:
        click.echo(json.dumps(result.as_json()))
    else:
        pruned = f"; deleted {len(result.pruned)} older" if result.pruned else ""
        click.echo(
            f"backup: {result.path} ({result.files} files, {result.bytes / 1e6:.1f} MB, "
            f"{result.seconds:.1f} s){pruned}"
        )


@click.command("restore")
@config_option
@click.argument("source", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--force", is_flag=True, help="Restore even over a server that holds uploads.")
@click.option("--lock-timeout", type=float, default=300, show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="Also log every command run.")
def restore_command(
    config_path: Path, source: Path, force: bool, lock_timeout: float, verbose: bool
) -> None:
    """Replace devpi's data with an export (a backup directory)."""
    config = load_config("restore", config_path)
    require_root("restore")
    log.configure(verbose=verbose)
    ctx = host_context(config)
    try:
        with single_run(LOCK_FILE, lock_timeout):
            result = restore(ctx, source.resolve(), force=force)
    except LockTimeout as error:
        fail("restore", str(error), EXIT_CANNOT_START)
    except (StepFailed, CommandFailed, OSError) as error:
        fail("restore", str(error), EXIT_FAILED)
    kept = (
        f"; the previous server directory is kept at {result.previous}" if result.previous else ""
    )
    click.echo(
        f"restore: {result.files} release files from {result.source} are served again "
        f"({result.seconds:.1f} s){kept}"
    )
