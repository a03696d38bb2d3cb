"""devpi's data as a whole: export it, import it into a new server directory, switch server
directories, and take an inventory of the uploaded files to prove nothing was lost.

Shared by `devpi-agent backup` / `restore` and the upgrade step. devpi's own tools do the work
(devpi-export, devpi-import, devpi-passwd), always as the service user, which owns the data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent.core.context import Context, StepFailed
from agent.core.files import fsync_dir
from agent.core.paths import DEVPI_PROGRAM
from agent.host.devpi_api import DevpiApi
from agent.host.devpi_server import run_devpi_tool
from agent.host.supervisor import supervisorctl, wait_for_devpi

DATAINDEX = "dataindex.json"
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
BACKUP_NAME = re.compile(r"^\d{8}T\d{6}Z$")
EXPORT_TIMEOUT = 6 * 3600.0


def timestamp(now: datetime | None = None) -> str:
    return (now or datetime.now(timezone.utc)).strftime(TIMESTAMP_FORMAT)


# --- inventories ------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class StoredFile:
    """One uploaded release file: where it lives in devpi and what its bytes hash to."""

    index: str
    name: str
    sha256: str


def _sha256_of(entry: dict[str, Any]) -> str:
    hashes = entry.get("hashes") or {}
    if "sha256" in hashes:
        return str(hashes["sha256"])
    spec = str(entry.get("hash_spec") or "")
    algorithm, _, value = spec.partition("=")
    return value if algorithm == "sha256" else spec


def export_inventory(export_dir: Path) -> set[StoredFile]:
    """The release files an export holds, from its dataindex.json."""
    data = json.loads((export_dir / DATAINDEX).read_text(encoding="utf-8"))
    files: set[StoredFile] = set()
    for index_name, index in (data.get("indexes") or {}).items():
        for entry in index.get("files") or []:
            if entry.get("type") != "releasefile":
                continue
            name = Path(entry["relpath"]).name
            files.add(StoredFile(index_name, name, _sha256_of(entry.get("entrymapping") or {})))
    return files


_SPECIAL_KINDS = {
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFSOCK: "socket",
}


def special_kind(mode: int) -> str | None:
    """What an entry is when it is neither a regular file nor a directory; None otherwise."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return _SPECIAL_KINDS.get(stat.S_IFMT(mode), f"file of type {stat.S_IFMT(mode):o}")


def check_export_entries(export_dir: Path) -> None:
    """Refuse an export holding anything but regular files and directories.

    Root copies an export the service user cannot read and chowns the copy to it: a link would
    be followed (/etc/shadow copied in as devpi's file), a fifo would hang the copy, a device
    would be read. devpi-export writes none of these, so one is a sign of tampering.
    """
    for directory, dirnames, filenames in os.walk(export_dir, onerror=_raise):
        for name in sorted(dirnames + filenames):
            path = Path(directory, name)
            kind = special_kind(os.lstat(path).st_mode)
            if kind is not None:
                relative = path.relative_to(export_dir)
                raise StepFailed(
                    f"{export_dir} holds {relative}, a {kind}: refused (a devpi export holds "
                    "only regular files and directories); nothing was changed"
                )


def _raise(error: OSError) -> None:
    raise error


def stage_indexes(api: DevpiApi) -> list[str]:
    """Every index that takes uploads (mirrors such as root/pypi hold no uploads)."""
    payload = api.checked("GET", "/")
    names = []
    for user, info in payload["result"].items():
        for index, config in (info.get("indexes") or {}).items():
            if config.get("type") != "mirror":
                names.append(f"{user}/{index}")
    return sorted(names)


def served_inventory(api: DevpiApi, indexes: Iterable[str] | None = None) -> set[StoredFile]:
    """The release files a running devpi serves from its own indexes (inherited ones left out)."""
    files: set[StoredFile] = set()
    for index_name in stage_indexes(api) if indexes is None else indexes:
        user, index = index_name.split("/")
        for project in api.projects(user, index):
            # ignore_bases: this index's own releases, without asking the PyPI mirror.
            payload = api.checked("GET", f"/{user}/{index}/{project}?ignore_bases")
            for version in (payload.get("result") or {}).values():
                for link in version.get("+links") or []:
                    href = str(link.get("href", ""))
                    if link.get("rel") == "releasefile" and f"/{index_name}/+f/" in href:
                        files.add(StoredFile(index_name, href.rsplit("/", 1)[-1], _sha256_of(link)))
    return files


def missing_files(expected: set[StoredFile], served: set[StoredFile]) -> list[StoredFile]:
    return sorted(expected - served)


def describe_missing(missing: list[StoredFile], limit: int = 5) -> str:
    shown = ", ".join(f"{f.index}/{f.name}" for f in missing[:limit])
    more = f" and {len(missing) - limit} more" if len(missing) > limit else ""
    return f"{len(missing)} files missing: {shown}{more}"


# --- devpi's tools, as the service user -------------------------------------------------------


def export_to(ctx: Context, target: Path, venv: Path | None = None) -> None:
    """devpi-export into `target` (absent or empty); a running server may keep running."""
    run_devpi_tool(
        ctx, "devpi-export", str(target), venv=venv, timeout=EXPORT_TIMEOUT, progress="devpi-export"
    )
    if not ctx.files.exists(target / DATAINDEX):
        raise StepFailed(f"devpi-export finished but {target / DATAINDEX} is missing")


def import_into(ctx: Context, serverdir: Path, source: Path, venv: Path | None = None) -> None:
    """devpi-import of `source` into a new server directory `serverdir` (must not exist)."""
    run_devpi_tool(
        ctx,
        "devpi-import",
        # Events (devpi-web's indexing) run after the start instead: the import itself
        # takes about a second instead of 14 s, and the server catches up by itself.
        "--no-events",
        str(source),
        serverdir=serverdir,
        venv=venv,
        timeout=EXPORT_TIMEOUT,
        progress="devpi-import",
    )
    if not ctx.files.exists(serverdir / ".nodeinfo"):
        raise StepFailed(f"devpi-import finished but {serverdir}/.nodeinfo is missing")


def set_root_password(ctx: Context, serverdir: Path, password: str) -> None:
    """devpi-passwd on a stopped server's directory: an import brings the exporting server's
    root password, but this host's is the one in devpi.root_password_file."""
    run_devpi_tool(
        ctx,
        "devpi-passwd",
        "root",
        serverdir=serverdir,
        # devpi-passwd asks through getpass, which prefers the terminal; without a
        # controlling terminal (setsid) it reads the two answers from stdin.
        wrapper=("setsid", "--wait"),
        input=f"{password}\n{password}\n",
        timeout=300,
    )


def stop_devpi(ctx: Context) -> None:
    supervisorctl(ctx, "stop", DEVPI_PROGRAM, check=False, timeout=120)


def start_devpi(ctx: Context) -> None:
    supervisorctl(ctx, "start", DEVPI_PROGRAM, check=False, timeout=120)
    wait_for_devpi(ctx)


def move(ctx: Context, source: Path, target: Path) -> None:
    real_source, real_target = ctx.files.host_path(source), ctx.files.host_path(target)
    if real_target.exists():
        raise StepFailed(f"cannot move {source} to {target}: it exists")
    real_source.rename(real_target)
    fsync_dir(real_target.parent)


def remove_tree(ctx: Context, path: Path) -> None:
    real = ctx.files.host_path(path)
    if real.exists():
        shutil.rmtree(real)


def readable_by(ctx: Context, user: str, path: Path) -> bool:
    return ctx.runner.run(["test", "-r", str(path)], user=user, check=False, timeout=30).ok
