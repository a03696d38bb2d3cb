"""Test hook: make the agent die at a named point, to prove that a re-run converges after a crash.

Only the crash tests set it; unset (always, in production) a crash point is one environment lookup.

    DEVPI_AGENT_CRASH_AT=<step>:<phase>     e.g. caddy:written, venv:before, supervisor:after
    DEVPI_AGENT_CRASH_AT=run:<label>~<text> while a command runs, at its first output line that
                                             contains <text> (<label>: the command's progress label,
                                             e.g. "pip install", or its program name)

The agent then SIGKILLs every process it started (pip, apt-get, dpkg, devpi-init...) and itself,
as a power cut or `kill -9` of its process group would; DEVPI_AGENT_CRASH_DELAY=<seconds> does
that so long after the point, the run going on meanwhile (a kill halfway through pip's install
phase, which prints nothing). DEVPI_AGENT_CRASH_MODE=raise raises CrashPointReached instead (a
step that crashes with a traceback).

The engine calls <step>:before and <step>:after around every step; the steps call the points
inside them (grep for `crashpoint(`).
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import suppress

CRASH_AT = "DEVPI_AGENT_CRASH_AT"
CRASH_MODE = "DEVPI_AGENT_CRASH_MODE"
CRASH_DELAY = "DEVPI_AGENT_CRASH_DELAY"

# Held by the runner while it starts a command. The kill takes it and never lets go: a step in
# another thread (core/engine.py's early steps) could otherwise start a command after the tree
# was collected, and that command would outlive the kill.
SPAWNING = threading.RLock()


class CrashPointReached(Exception):
    """Raised at the point in DEVPI_AGENT_CRASH_AT when DEVPI_AGENT_CRASH_MODE=raise."""


def crashpoint(name: str, output: str | None = None) -> None:
    """Die here if DEVPI_AGENT_CRASH_AT names this point (`output`: a line a command printed)."""
    wanted = os.environ.get(CRASH_AT)
    if not wanted:
        return
    if output is None:
        hit = wanted == name
    else:
        point, tilde, text = wanted.partition("~")
        hit = bool(tilde) and point == name and text in output
    if not hit:
        return
    # Only a step may raise: an output line is read in another thread, where nothing would see it.
    if os.environ.get(CRASH_MODE) == "raise" and output is None:
        raise CrashPointReached(f"test hook {CRASH_AT}={wanted} reached")
    delay = float(os.environ.get(CRASH_DELAY) or 0)
    if delay > 0:
        os.environ[CRASH_AT] = ""  # once
        threading.Timer(delay, _kill_process_tree).start()
    else:
        _kill_process_tree()


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as handle:
                stat = handle.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _kill_process_tree() -> None:
    """SIGKILL every descendant, then this process. Descendants are stopped first, so none can
    fork a new child or be re-parented to init while the tree is collected."""
    SPAWNING.acquire()
    me = os.getpid()
    stopped: set[int] = set()
    while True:
        children = _children_by_parent()
        tree: list[int] = []
        todo = [me]
        while todo:
            for child in children.get(todo.pop(), []):
                tree.append(child)
                todo.append(child)
        fresh = [pid for pid in tree if pid not in stopped]
        if not fresh:
            break
        for pid in fresh:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            stopped.add(pid)
    for pid in stopped:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    os.kill(me, signal.SIGKILL)
