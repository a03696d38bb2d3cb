"""Runs the steps in order, times them, stops at the first failure, and sums up the run."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.core.context import Context, Step, StepFailed
from agent.core.crashpoint import crashpoint
from agent.core.files import FileChange
from agent.core.runner import CommandFailed

Status = Literal["ok", "changed", "failed"]
LOCK_FILE = Path("/run/lock/devpi-agent.lock")


@dataclass
class StepReport:
    name: str
    status: Status
    seconds: float
    changes: list[str] = field(default_factory=list)
    error: str | None = None
    # The diffs of the files this step wrote (or would write, in plan).
    file_changes: list[FileChange] = field(default_factory=list)


@dataclass
class RunReport:
    steps: list[StepReport]
    skipped: list[str]
    seconds: float
    file_changes: list[FileChange]

    def count(self, status: Status) -> int:
        return sum(1 for step in self.steps if step.status == status)

    @property
    def failed(self) -> bool:
        return self.count("failed") > 0

    def as_json(self) -> dict[str, Any]:
        return {
            "changed": self.count("changed"),
            "failed": self.count("failed"),
            "steps": [
                {"name": s.name, "status": s.status, "seconds": round(s.seconds, 3)}
                for s in self.steps
            ],
        }

    def recap(self) -> str:
        return (
            f"recap: ok={self.count('ok')} changed={self.count('changed')} "
            f"failed={self.count('failed')} skipped={len(self.skipped)} "
            f"seconds={self.seconds:.1f}"
        )


def run_steps(ctx: Context, steps: Sequence[Step]) -> RunReport:
    started = time.monotonic()
    reports: list[StepReport] = []
    skipped: list[str] = []
    for position, step in enumerate(steps):
        ctx.changes = []
        files_before = len(ctx.files.changes)
        log = ctx.log.bind(step=step.name)
        step_ctx_log, ctx.log = ctx.log, log
        began = time.monotonic()
        error: str | None = None
        try:
            crashpoint(f"{step.name}:before")
            step.converge(ctx)
            crashpoint(f"{step.name}:after")
        except (StepFailed, CommandFailed) as failure:
            error = str(failure)
            log.error("step failed", error=error)
        except Exception as failure:  # a bug: keep the traceback, redacted, in the logs
            error = f"{type(failure).__name__}: {failure}"
            log.exception("step crashed", error=error)
        finally:
            ctx.log = step_ctx_log
        seconds = time.monotonic() - began
        status: Status = "failed" if error else ("changed" if ctx.changes else "ok")
        step_files = list(ctx.files.changes[files_before:])
        reports.append(StepReport(step.name, status, seconds, list(ctx.changes), error, step_files))
        log.info("step", status=status, seconds=round(seconds, 3))
        if error:
            skipped = [s.name for s in steps[position + 1 :]]
            break
    return RunReport(reports, skipped, time.monotonic() - started, list(ctx.files.changes))


class LockTimeout(Exception):
    pass


@contextmanager
def single_run(lock_file: Path, timeout: float) -> Iterator[None]:
    """One apply at a time; another run waits up to `timeout` seconds, then gives up."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    raise LockTimeout(
                        f"another devpi-agent run (pid {holder}) holds {lock_file}; "
                        f"gave up after waiting {timeout:g} s"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
