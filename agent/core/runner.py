"""The one way the agent runs commands: a thin layer over `sh`.

Secrets travel on stdin or in the environment of the child, never in argv; everything logged
(argv, output) passes the redactor. A terminal gets a live progress line for long commands.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import sh

from agent.core import log
from agent.core.crashpoint import SPAWNING, crashpoint
from agent.core.log import redactor

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, lines: int = 15) -> str:
        """The last lines of output, redacted, for error messages."""
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return redactor("\n".join(text[-lines:]))


class CommandFailed(Exception):
    def __init__(self, result: Result) -> None:
        self.result = result
        argv = redactor(" ".join(result.argv))
        what = "timed out" if result.returncode == -9 else f"exited {result.returncode}"
        super().__init__(f"`{argv}` {what}:\n{result.tail()}")


class Runner(Protocol):
    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        timeout: float = 300,
        check: bool = True,
        progress: str | None = None,
    ) -> Result: ...

    def which(self, program: str) -> str | None: ...


class _Progress:
    """One self-overwriting status line on a terminal, so long steps visibly move.

    Steps may run side by side (core/engine.py): the line then shows every running command.
    """

    _running: ClassVar[list[_Progress]] = []
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, label: str) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty()
        self.started = time.monotonic()
        self.last_draw = 0.0
        self.text = ""
        if self.enabled:
            with self._lock:
                self._running.append(self)

    def __call__(self, line: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last_draw < 0.1:
            return
        self.last_draw = now
        self.text = redactor(line.strip().replace("\r", " "))
        with self._lock:
            self._draw(now)

    def _draw(self, now: float) -> None:
        width = shutil.get_terminal_size((80, 20)).columns
        share = max(20, (width - 1) // max(1, len(self._running)))
        parts = [
            f"  {bar.label} [{now - bar.started:5.1f}s] {bar.text}"[:share] for bar in self._running
        ]
        sys.stderr.write("\r\x1b[K" + "".join(parts)[: width - 1])
        sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self in self._running:
                self._running.remove(self)
            sys.stderr.write("\r\x1b[K")
            if self._running:
                self._draw(time.monotonic())
            sys.stderr.flush()


class ShRunner:
    """Runs commands for real."""

    def __init__(self) -> None:
        self.log = log.get("runner")

    def which(self, program: str) -> str | None:
        return shutil.which(program, path=BASE_PATH)

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        timeout: float = 300,
        check: bool = True,
        progress: str | None = None,
    ) -> Result:
        full_argv = list(argv)
        if user is not None and user != "root":
            # runuser keeps the environment we pass and resets HOME/USER for the target user.
            full_argv = ["runuser", "-u", user, "--", *full_argv]
        child_env = {
            "PATH": BASE_PATH,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            **{k: v for k, v in os.environ.items() if k in _INHERITED_ENV},
            **(env or {}),
        }
        shown = redactor(" ".join(full_argv))
        self.log.debug("run", command=shown, cwd=cwd)
        out_lines: list[str] = []
        err_lines: list[str] = []
        bar = _Progress(progress) if progress else None
        point = f"run:{progress or os.path.basename(argv[0])}"

        def on_out(line: str) -> None:
            out_lines.append(line)
            crashpoint(point, line)
            if bar:
                bar(line)

        def on_err(line: str) -> None:
            err_lines.append(line)
            crashpoint(point, line)

        started = time.monotonic()
        try:
            program = sh.Command(full_argv[0])
        except sh.CommandNotFound:
            result = Result(tuple(full_argv), 127, "", f"{full_argv[0]}: command not found", 0.0)
        else:
            returncode = 0
            try:
                with SPAWNING:
                    running = program(
                        *full_argv[1:],
                        _in=input if input is not None else "",
                        _env=child_env,
                        _cwd=cwd,
                        _tty_out=False,
                        _out=on_out,
                        _err=on_err,
                        _ok_code=list(range(256)),
                        _bg=True,
                        _bg_exc=False,
                        _return_cmd=True,
                        _encoding="utf-8",
                        _decode_errors="replace",
                    )
                returncode = _wait(running, timeout)
            except sh.SignalException as error:
                returncode = -abs(error.exit_code)
            finally:
                if bar:
                    bar.close()
            result = Result(
                tuple(full_argv),
                returncode,
                "".join(out_lines),
                "".join(err_lines),
                time.monotonic() - started,
            )
        self.log.debug("ran", command=shown, rc=result.returncode, seconds=round(result.seconds, 3))
        if check and not result.ok:
            raise CommandFailed(result)
        return result


def _wait(running: sh.RunningCommand, timeout: float) -> int:
    """The exit code, or -9 after killing a command that outran its timeout.

    A timer does the killing because sh's own timeouts (`_timeout`, `wait(timeout=)`) poll every
    0.1 s, which made each short command (systemctl, caddy version) take 0.1 s longer, and
    `wait(timeout=)` returns before the output is read.
    """
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            running.process.kill()

    timer = threading.Timer(timeout, kill)
    timer.daemon = True
    timer.start()
    try:
        running.wait()
    except sh.SignalException:
        if timed_out.is_set():
            return -9
        raise
    finally:
        timer.cancel()
    return int(running.exit_code)


# Proxy and CA settings a site relies on are passed to children; nothing else leaks through.
_INHERITED_ENV = frozenset(
    {
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "TERM",
    }
)
