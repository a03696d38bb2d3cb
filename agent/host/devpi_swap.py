"""Switching devpi to a server directory imported from an export, and back when that fails.

The one implementation behind the upgrade step (the new devpi-server imports an export of the
old one) and `devpi-agent restore` (an export from a backup): import beside the live server
directory, switch the two, start devpi, prove that it serves every release file of the export
with its sha256; on a failure, the previous directory goes back in place and is started.

Nothing is deleted but an import that never served: the replaced directory stays beside the live
one, and so does an imported one that failed after serving (anything may have reached it in its
seconds of service). Every move is a rename, so `roll_back` finishes from whatever state a run
was cut in: the upgrade keeps the names in a record and rolls back first on its next run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.core.context import Context, StepFailed
from agent.host.devpi_api import DevpiApi
from agent.host.devpi_data import (
    StoredFile,
    describe_missing,
    import_into,
    missing_files,
    move,
    remove_tree,
    served_inventory,
    start_devpi,
    stop_devpi,
)


@dataclass(frozen=True)
class Swap:
    """The directories of one switch; all beside the live one, so that a move is a rename."""

    live: Path
    staging: Path  # the import lands here
    previous: Path  # the live directory goes here when the import takes its place
    failed: Path  # an imported directory that served and failed goes here

    @classmethod
    def beside(cls, live: Path, *, staging: str, previous: str, failed: str) -> Swap:
        def sibling(suffix: str) -> Path:
            return live.with_name(f"{live.name}.{suffix}")

        return cls(live, sibling(staging), sibling(previous), sibling(failed))


def import_beside(ctx: Context, swap: Swap, source: Path) -> None:
    """devpi-import of the export `source` into the staging directory, none left if it fails."""
    try:
        import_into(ctx, swap.staging, source)
    except BaseException:
        remove_tree(ctx, swap.staging)
        raise


def switch_and_check(ctx: Context, swap: Swap, expected: set[StoredFile], *, serving: str) -> bool:
    """The imported directory live (devpi stopped), devpi started and checked to serve every
    file of `expected`; True if a previous directory was moved aside. `serving` names the new
    server in the failure ("<serving> does not serve the export: ...")."""
    kept = ctx.files.exists(swap.live)
    if kept:
        move(ctx, swap.live, swap.previous)
    move(ctx, swap.staging, swap.live)
    start_devpi(ctx)
    missing = missing_files(expected, served_inventory(DevpiApi(ctx.config.devpi.port)))
    if missing:
        raise StepFailed(f"{serving} does not serve the export: {describe_missing(missing)}")
    return kept


def roll_back(ctx: Context, swap: Swap, *, also: Callable[[], None] | None = None) -> None:
    """The previous directory live and running again, from whatever state the switch is in.

    `also` undoes what the caller changed besides the directories; it runs before devpi starts.
    """
    stop_devpi(ctx)
    if ctx.files.exists(swap.previous):
        if ctx.files.exists(swap.live):
            move(ctx, swap.live, swap.failed)
        move(ctx, swap.previous, swap.live)
    remove_tree(ctx, swap.staging)
    if also is not None:
        also()
    if ctx.files.exists(swap.live / ".nodeinfo"):
        start_devpi(ctx)
