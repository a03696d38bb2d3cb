"""Runs the steps in order, times them, stops at the first failure, and sums up the run."""

from __future__ import annotations

import fcntl
import os
import threading
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
    # When it began, in seconds after the run began; early: it ran beside the steps before it.
    started: float = 0.0
    early: bool = False


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
                {
                    "name": s.name,
                    "status": s.status,
                    "seconds": round(s.seconds, 3),
                    "started": round(s.started, 3),
                    **({"early": True} if s.early else {}),
                }
                for s in self.steps
            ],
        }

    def recap(self) -> str:
        return (
            f"recap: ok={self.count('ok')} changed={self.count('changed')} "
            f"failed={self.count('failed')} skipped={len(self.skipped)} "
            f"seconds={self.seconds:.1f}"
        )


def _run_one(ctx: Context, step: Step, run_started: float, *, early: bool = False) -> StepReport:
    ctx.changes = []
    files_before = len(ctx.files.changes)
    log = ctx.log.bind(step=step.name)
    outer_log, ctx.log = ctx.log, log
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
        ctx.log = outer_log
    seconds = time.monotonic() - began
    status: Status = "failed" if error else ("changed" if ctx.changes else "ok")
    step_files = list(ctx.files.changes[files_before:])
    log.info("step", status=status, seconds=round(seconds, 3), **({"early": True} if early else {}))
    return StepReport(
        step.name,
        status,
        seconds,
        list(ctx.changes),
        error,
        step_files,
        started=began - run_started,
        early=early,
    )


class _EarlyStep:
    """A step running in a thread of its own from the start of the run, on a forked context."""

    def __init__(self, ctx: Context, step: Step, run_started: float) -> None:
        self.step = step
        self.ctx = ctx.fork()
        self.report: StepReport | None = None
        self._thread = threading.Thread(
            target=self._run, args=(run_started,), name=f"step-{step.name}", daemon=True
        )
        self._thread.start()

    def _run(self, run_started: float) -> None:
        self.report = _run_one(self.ctx, self.step, run_started, early=True)

    @property
    def failed(self) -> bool:
        return self.report is not None and self.report.status == "failed"

    def join(self, ctx: Context) -> StepReport:
        """Wait for it; its file changes join the run's, in the order the steps are reported."""
        self._thread.join()
        assert self.report is not None
        ctx.files.changes.extend(self.ctx.files.changes)
        return self.report


def _start_early(ctx: Context, steps: Sequence[Step], run_started: float) -> dict[str, _EarlyStep]:
    # Not in plan: it changes nothing, so nothing is gained, and its output keeps step order.
    if ctx.check:
        return {}
    early: dict[str, _EarlyStep] = {}
    for step in steps:
        if step.can_start_early is not None and step.can_start_early(ctx):
            ctx.log.info("start early", step=step.name)
            early[step.name] = _EarlyStep(ctx, step, run_started)
    return early


def run_steps(ctx: Context, steps: Sequence[Step]) -> RunReport:
    """The steps in order; one whose can_start_early says so runs from the start beside them.

    The first failure stops the run: that of a step in order, or of an early step, seen before
    the next step would begin. Early steps still running are waited for, never left behind.
    """
    started = time.monotonic()
    early = _start_early(ctx, steps, started)
    reports: list[StepReport] = []
    skipped: list[str] = []
    done: set[str] = set()
    for step in steps:
        if step.name in done:
            continue
        failed_early = next((e for e in early.values() if e.failed), None)
        if failed_early is not None:
            reports.append(early.pop(failed_early.step.name).join(ctx))
            done.add(failed_early.step.name)
            break
        running = early.pop(step.name, None)
        report = running.join(ctx) if running else _run_one(ctx, step, started)
        reports.append(report)
        done.add(step.name)
        if report.status == "failed":
            break
    for name in list(early):
        reports.append(early.pop(name).join(ctx))
        done.add(name)
    if any(report.status == "failed" for report in reports):
        skipped = [step.name for step in steps if step.name not in done]
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
