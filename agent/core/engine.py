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

    def as_json(self, *, changes: bool = False) -> dict[str, Any]:
        """The run in one document; `changes`: each step's list of what it changed (or, in
        plan, would change), as the log says it (redacted by the caller)."""
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
                    **({"changes": list(s.changes)} if changes else {}),
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


class _EarlyChain:
    """The early steps, one after another in their order, in a thread of their own from the
    start of the run, each on a forked context; the chain stops at its first failure."""

    def __init__(self, ctx: Context, steps: list[Step], run_started: float) -> None:
        self.steps = steps
        self._contexts = {step.name: ctx.fork() for step in steps}
        self._done: dict[str, threading.Event] = {step.name: threading.Event() for step in steps}
        self._reports: dict[str, StepReport] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(run_started,), name="early-steps", daemon=True
        )
        self._thread.start()

    def _run(self, run_started: float) -> None:
        try:
            for step in self.steps:
                if self._stop.is_set():
                    break
                report = _run_one(self._contexts[step.name], step, run_started, early=True)
                self._reports[step.name] = report
                self._done[step.name].set()
                if report.status == "failed":
                    break
        finally:
            for event in self._done.values():
                event.set()

    def __contains__(self, name: str) -> bool:
        return name in self._done

    def failed(self) -> StepReport | None:
        """The early step that failed, if one has by now."""
        return next((r for r in self._reports.values() if r.status == "failed"), None)

    def join(self, ctx: Context, name: str) -> StepReport | None:
        """Wait for one early step; its report (None: the chain stopped before it), its file
        changes joined to the run's in the order the steps are reported."""
        self._done[name].wait()
        report = self._reports.get(name)
        if report is not None:
            ctx.files.changes.extend(self._contexts[name].files.changes)
        return report

    def stop(self) -> None:
        """Start no further early step (the one running finishes)."""
        self._stop.set()

    def wait(self) -> None:
        self._thread.join()


def _start_early(ctx: Context, steps: Sequence[Step], run_started: float) -> _EarlyChain | None:
    # Not in plan: it changes nothing, so nothing is gained, and its output keeps step order.
    if ctx.check:
        return None
    early = [s for s in steps if s.can_start_early is not None and s.can_start_early(ctx)]
    if not early:
        return None
    ctx.log.info("start early", steps=[s.name for s in early])
    return _EarlyChain(ctx, early, run_started)


def run_steps(ctx: Context, steps: Sequence[Step]) -> RunReport:
    """The steps in order; those whose can_start_early says so run from the start, one after
    another in a thread of their own, beside the others, and are reported in their places.

    The first failure stops the run: that of a step in order, or of an early step, seen before
    the next step would begin. Early steps still running are waited for, never left behind.
    """
    started = time.monotonic()
    early = _start_early(ctx, steps, started)
    reports: list[StepReport] = []
    done: set[str] = set()
    for step in steps:
        failed_early = early.failed() if early is not None else None
        if failed_early is not None and failed_early.name not in done:
            early.join(ctx, failed_early.name)  # type: ignore[union-attr]
            reports.append(failed_early)
            done.add(failed_early.name)
            break
        if early is not None and step.name in early:
            report = early.join(ctx, step.name)
            if report is None:  # the chain stopped at a failure the loop has not seen yet
                continue
        else:
            report = _run_one(ctx, step, started)
        reports.append(report)
        done.add(step.name)
        if report.status == "failed":
            break
    if early is not None:
        early.stop()
        early.wait()
        for step in early.steps:
            if step.name not in done:
                report = early.join(ctx, step.name)
                if report is not None:
                    reports.append(report)
                    done.add(step.name)
    skipped: list[str] = []
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
