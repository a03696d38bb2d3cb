"""`devpi-agent backup` and `devpi-agent restore DIR`.

backup: devpi-export into <backup.dir>/.<timestamp>.partial, renamed to <backup.dir>/<timestamp>
only once complete (a cut-short backup never looks like a good one), then the oldest beyond
`backup.keep` are deleted. The timer or cron job of the `backup` step runs exactly this.

With backup.remote set, each finished backup then goes to the restic repository there
(host/restic.py), remote_keep applies there, and remote-backup.json records the result; a failed
push leaves the local backup and exits 1.

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
from collections.abc import Iterator
from contextlib import contextmanager
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
from agent.core.status import write_status
from agent.host import restic
from agent.host.devpi_api import DevpiApi
from agent.host.devpi_data import (
    BACKUP_NAME,
    DATAINDEX,
    StoredFile,
    check_export_entries,
    export_inventory,
    export_to,
    move,
    readable_by,
    remove_tree,
    set_root_password,
    stage_indexes,
    stop_devpi,
    timestamp,
)
from agent.host.devpi_server import root_password
from agent.host.devpi_swap import Swap, import_beside, roll_back, switch_and_check
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
    expected, password = check_restorable(ctx, source, force=force)
    stamp = timestamp()
    swap = Swap.beside(
        ctx.config.devpi.serverdir,
        staging=f"restore-{stamp}",
        previous=f"before-restore-{stamp}",
        failed=f"failed-restore-{stamp}",
    )
    # devpi keeps serving the current data during the import, which may take long.
    with readable_export(ctx, source, stamp) as readable:
        import_beside(ctx, swap, readable)
    stop_devpi(ctx)
    try:
        set_root_password(ctx, swap.staging, password)
        kept = switch_and_check(ctx, swap, expected, serving="the restored server")
    except BaseException as error:
        ctx.log.error(
            "restore failed, putting the previous server directory back", error=str(error)
        )
        roll_back(ctx, swap)
        raise
    # The export's users keep their old passwords: the configured ones are set again.
    devpi_users.converge(ctx)
    warm_mirror(ctx)
    previous = swap.previous if kept else None
    return RestoreResult(source, len(expected), previous, time.monotonic() - started)


def check_restorable(ctx: Context, source: Path, *, force: bool) -> tuple[set[StoredFile], str]:
    """The export's release files and this host's root password, or StepFailed saying why the
    export cannot be restored here; nothing is changed."""
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
    if not force and ctx.files.exists(devpi.serverdir / ".nodeinfo"):
        refuse_over_uploads(ctx)
    password = root_password(ctx)
    if password is None:
        raise StepFailed(f"{devpi.root_password_file} is missing: run `devpi-agent apply` first")
    return expected, password


def refuse_over_uploads(ctx: Context) -> None:
    """StepFailed if the running devpi holds uploads a restore would replace, or if it is not
    running (then nobody can tell)."""
    devpi = ctx.config.devpi
    if not devpi_api_answers(devpi.port):
        raise StepFailed(
            f"devpi is not running, so the agent cannot tell whether {devpi.serverdir} "
            "holds uploads; start it (devpi-agent apply) or restore with --force"
        )
    uploads = existing_uploads(DevpiApi(devpi.port))
    if uploads:
        shown = ", ".join(uploads[:5]) + (" ..." if len(uploads) > 5 else "")
        raise StepFailed(
            f"this server already holds uploads ({shown}); restoring replaces them: "
            "use --force (the current server directory is kept beside the restored one)"
        )


@contextmanager
def readable_export(ctx: Context, source: Path, stamp: str) -> Iterator[Path]:
    """`source`, or a copy of it the service user can read (removed afterwards): devpi-import
    runs as the service user, and an export copied in as root may be closed to it."""
    devpi = ctx.config.devpi
    if readable_by(ctx, devpi.user, source / DATAINDEX):
        yield source
        return
    copy = devpi.home / f".restore-source-{stamp}"
    ctx.log.info("copying the export for the service user", source=str(source), to=str(copy))
    # symlinks=True: never follow one, should the export change after the check.
    shutil.copytree(source, ctx.files.host_path(copy), symlinks=True)
    ctx.runner.run(["chown", "-R", f"{devpi.user}:{devpi.user}", str(copy)], timeout=3600)
    try:
        yield copy
    finally:
        remove_tree(ctx, copy)


@contextmanager
def _locked(
    command: str, config_path: Path, lock_timeout: float, verbose: bool
) -> Iterator[Context]:
    """The host's context for `command` under the agent's lock, exiting 3 when the lock stays
    taken and 1 on a failure."""
    config = load_config(command, config_path)
    require_root(command)
    log.configure(verbose=verbose)
    ctx = host_context(config)
    try:
        with single_run(LOCK_FILE, lock_timeout):
            yield ctx
    except LockTimeout as error:
        fail(command, str(error), EXIT_CANNOT_START)
    except (StepFailed, CommandFailed, OSError) as error:
        fail(command, str(error), EXIT_FAILED)


@click.command("backup")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--lock-timeout", type=float, default=3600, show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="Also log every command run.")
def backup(config_path: Path, as_json: bool, lock_timeout: float, verbose: bool) -> None:
    """Export devpi now into backup.dir/<timestamp>; keep the newest backup.keep."""
    with _locked("backup", config_path, lock_timeout, verbose) as ctx:
        try:
            result = make_backup(ctx)
        except BaseException as error:
            write_status(ctx.files, "backup", ok=False, error=str(error) or type(error).__name__)
            raise
        write_status(ctx.files, "backup", ok=True, **result.as_json())
        ctx.log.info("backup", **result.as_json())
        if not ctx.config.backup.remote:
            _report(result.as_json(), as_json)
            return
        remote = push_remote(ctx, result)
        _report({**result.as_json(), "remote": remote}, as_json)
        if not remote["ok"]:
            raise StepFailed(str(remote["error"]))


def _report(document: dict[str, object], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(document))
        return
    pruned = document["pruned"]
    deleted = f"; deleted {len(pruned)} older" if isinstance(pruned, list) and pruned else ""
    click.echo(
        f"backup: {document['path']} ({document['files']} files, "
        f"{int(str(document['bytes'])) / 1e6:.1f} MB, {document['seconds']} s){deleted}"
    )
    remote = document.get("remote")
    if isinstance(remote, dict) and remote.get("ok"):
        click.echo(
            f"remote backup: snapshot {remote['snapshot']} in {remote['remote']} "
            f"({int(remote['added']) / 1e6:.1f} MB new, {remote['seconds']} s)"
        )


def push_remote(ctx: Context, result: BackupResult) -> dict[str, object]:
    """Send the finished local backup to backup.remote; its record (remote-backup.json), whose
    fields the metrics read: ok, snapshot, bytes, seconds | error."""
    started = time.monotonic()
    remote = ctx.config.backup.remote
    try:
        pushed = restic.push(ctx, result.path, result.path.name)
    except (StepFailed, CommandFailed, OSError) as error:
        message = str(error) or type(error).__name__
        ctx.log.error("remote backup failed; the local backup is kept", error=message)
        return write_status(
            ctx.files,
            "remote-backup",
            ok=False,
            remote=remote,
            backup=str(result.path),
            error=f"{message}\n(the local backup {result.path} is kept)",
            seconds=round(time.monotonic() - started, 3),
        )
    record = write_status(
        ctx.files,
        "remote-backup",
        ok=True,
        remote=remote,
        backup=str(result.path),
        snapshot=pushed.snapshot,
        bytes=pushed.bytes_processed,
        added=pushed.bytes_added,
        seconds=round(time.monotonic() - started, 3),
    )
    ctx.log.info("remote backup", **record)
    return record


@contextmanager
def remote_export(ctx: Context, wanted: str) -> Iterator[Path]:
    """The export of snapshot `wanted` of backup.remote, restored into a directory under
    backup.dir (removed afterwards; a leftover is cleaned by the next backup)."""
    if not ctx.config.backup.remote:
        raise StepFailed("restore --remote: backup.remote is not set in the config")
    snapshot = restic.pick(restic.snapshots(ctx), wanted)
    devpi, directory = ctx.config.devpi, ctx.config.backup.dir
    ctx.mkdir(directory, mode=0o700, owner=devpi.user, group=devpi.user, key="backup.dir")
    target = directory / f".remote-{snapshot.short_id}-{timestamp()}.partial"
    ctx.log.info("restoring from the remote", snapshot=snapshot.id, into=str(target))
    try:
        yield ctx.files.host_path(restic.restore(ctx, snapshot, target))
    finally:
        remove_tree(ctx, target)


@click.command("restore")
@config_option
@click.argument(
    "source", required=False, type=click.Path(path_type=Path, file_okay=False, exists=True)
)
@click.option(
    "--remote",
    "snapshot",
    is_flag=False,
    flag_value="latest",
    default=None,
    metavar="[SNAPSHOT]",
    help="Restore a snapshot of backup.remote (its ID, a backup's name, or latest).",
)
@click.option("--force", is_flag=True, help="Restore even over a server that holds uploads.")
@click.option("--lock-timeout", type=float, default=300, show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="Also log every command run.")
def restore_command(
    config_path: Path,
    source: Path | None,
    snapshot: str | None,
    force: bool,
    lock_timeout: float,
    verbose: bool,
) -> None:
    """Replace devpi's data with an export (a backup directory, or --remote's snapshot)."""
    if (source is None) == (snapshot is None):
        fail("restore", "give a backup directory or --remote [SNAPSHOT] (one of them)", 2)
    with _locked("restore", config_path, lock_timeout, verbose) as ctx:
        if snapshot is not None:
            with remote_export(ctx, snapshot) as exported:
                result = restore(ctx, exported, force=force)
        else:
            assert source is not None
            result = restore(ctx, source.resolve(), force=force)
    kept = (
        f"; the previous server directory is kept at {result.previous}" if result.previous else ""
    )
    click.echo(
        f"restore: {result.files} release files from {result.source} are served again "
        f"({result.seconds:.1f} s){kept}"
    )
