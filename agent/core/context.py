"""What every step gets: the config, the runner, the file writer, and a way to report changes.

A step looks at the host, compares with the config, and acts only on the difference:

    if ctx.change("install caddy"):
        ctx.runner.run([...])

`ctx.change` records the change and returns False in check mode, so the same code plans and applies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from agent.core import log
from agent.core.config import Config
from agent.core.files import DirectoryNotOwned, FileChange, Files
from agent.core.paths import PENDING_DIR
from agent.core.platform import OsRelease
from agent.core.runner import Runner


class StepFailed(Exception):
    """A step could not reach its goal; the message says what and why, for a person."""


@dataclass
class Context:
    config: Config
    runner: Runner
    files: Files
    os: OsRelease
    systemd: bool
    check: bool = False
    changes: list[str] = field(default_factory=list)
    log: Any = field(default_factory=log.get)
    _pending_in_memory: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.files.on_change = self._file_changed

    def _file_changed(self, change: FileChange) -> None:
        # A file the step wrote, removed or re-permissioned is a change of that step, unless
        # the step already said so in its own words ("remove X (backup.enabled = false)").
        if not any(str(change.path) in said for said in self.changes):
            self.change(change.what)

    def fork(self) -> Context:
        """A context for a step that runs beside the others (core/engine.py): its own changes,
        file records and log binding; the same host, runner and pending markers."""
        return replace(
            self,
            files=self.files.fork(),
            changes=[],
            _pending_in_memory=self._pending_in_memory,
        )

    def change(self, description: str, **details: Any) -> bool:
        """Record a change; True if it should be carried out (False in check mode)."""
        self.changes.append(description)
        self.log.info("would change" if self.check else "change", what=description, **details)
        return not self.check

    def write(self, path: Path, content: str | bytes, **kwargs: Any) -> bool:
        """ensure_file; the change (and its diff) is this step's."""
        return self.files.ensure_file(path, content, **kwargs)

    def mkdir(self, path: Path, **kwargs: Any) -> bool:
        """ensure_dir; key= for a configured directory (see files), refused as a StepFailed."""
        try:
            return self.files.ensure_dir(path, **kwargs)
        except DirectoryNotOwned as error:
            raise StepFailed(str(error)) from None

    def mkparent(self, path: Path, **kwargs: Any) -> bool:
        """The directory of a configured file: made if missing, an existing one left alone."""
        return self.files.ensure_parent(path, **kwargs)

    # A service restart that was due when a run died must still happen on the next run, so
    # "restart needed" lives on disk until the restart succeeded.
    def mark_pending(self, what: str) -> None:
        self._pending_in_memory.add(what)
        if not self.check:
            marker = self.files.host_path(PENDING_DIR / what)
            marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            marker.touch(mode=0o600)

    def is_pending(self, what: str) -> bool:
        return what in self._pending_in_memory or self.files.exists(PENDING_DIR / what)

    def clear_pending(self, what: str) -> None:
        self._pending_in_memory.discard(what)
        if not self.check:
            self.files.host_path(PENDING_DIR / what).unlink(missing_ok=True)


@dataclass(frozen=True)
class Step:
    """One thing `apply` converges. A step is a module under agent/steps/ with

    - ``NAME``: the name in logs, reports and the recap (``"devpi-config"``);
    - ``converge(ctx)``: look, compare, act only on the difference; every change goes through
      ``ctx.change``/``ctx.write``/``ctx.mkdir`` (so ``plan`` shows it and changes nothing),
      a failure raises ``StepFailed`` with a message for a person;
    - a docstring whose first line says what it converges (``devpi-agent plan`` prints it).

    - optionally ``can_start_early(ctx) -> bool``: True when, on this run, the step needs
      nothing the steps before it make; the engine then starts it at the beginning of the run,
      beside them, and takes its result when the run reaches it (the venv builds while apt
      installs).

    It imports agent.host, agent.facts and agent.core, never another step
    (docs/architecture.md). The list of steps, in order, is agent/steps/__init__.py.
    """

    name: str
    converge: Callable[[Context], None]
    description: str
    can_start_early: Callable[[Context], bool] | None = None

    @classmethod
    def of(cls, module: ModuleType) -> Step:
        """The step a module defines; TypeError naming what it lacks."""
        name = getattr(module, "NAME", None)
        converge = getattr(module, "converge", None)
        doc = (module.__doc__ or "").strip()
        lacking = [
            what
            for what, present in (
                ("NAME (a non-empty str)", isinstance(name, str) and bool(name)),
                ("converge(ctx)", callable(converge)),
                ("a docstring", bool(doc)),
            )
            if not present
        ]
        if lacking:
            raise TypeError(f"step module {module.__name__} lacks {', '.join(lacking)}")
        assert isinstance(name, str) and converge is not None
        early = getattr(module, "can_start_early", None)
        return cls(name, converge, doc.splitlines()[0], early if callable(early) else None)
