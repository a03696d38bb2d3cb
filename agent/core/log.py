"""Structured logging: console on a TTY, JSON lines otherwise, JSON lines to the agent log.

Every event passes the Redactor last, so no configured secret reaches any output, tracebacks
included.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sys
import threading
import urllib.parse
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

AGENT_LOG = Path("/var/log/devpi-agent/agent.core.log")
REDACTED = "********"


class Redactor:
    """Replaces every registered secret (and its URL-encoded and base64 forms) with stars."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, secret: str, *, user: str | None = None) -> None:
        if not secret:
            return
        forms = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}
        if user is not None:
            forms.add(base64.b64encode(f"{user}:{secret}".encode()).decode())
        with self._lock:
            # Very short secrets would blank out ordinary words; they are still rejected
            # elsewhere for being weak, but never logged verbatim in argv either.
            self._secrets.update(f for f in forms if len(f) >= 3)

    def add_all(self, secrets: Iterable[str]) -> None:
        for secret in secrets:
            self.add(secret)

    def __call__(self, text: str) -> str:
        # Longest first, so a secret that contains another is replaced whole.
        for secret in sorted(self._secrets, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            return self(value)
        if isinstance(value, bytes):
            return self(value.decode("utf-8", "replace"))
        if isinstance(value, dict):
            return {k: self.scrub(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.scrub(v) for v in value]
        return value


redactor = Redactor()


def _redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return {key: redactor.scrub(value) for key, value in event_dict.items()}


class _AgentLogFile:
    """Appends rendered JSON lines to the agent log; silently disabled if it cannot be opened."""

    def __init__(self) -> None:
        self.stream: TextIO | None = None

    def open(self, path: Path) -> None:
        if self.stream is not None:
            self.stream.close()
        try:
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self.stream = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
        except OSError:
            self.stream = None

    def write(self, event_dict: MutableMapping[str, Any]) -> None:
        if self.stream is not None:
            self.stream.write(json.dumps(event_dict, default=str) + "\n")


agent_log = _AgentLogFile()


def _tee_to_file(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    agent_log.write(event_dict)
    return event_dict


def configure(
    *, stream: TextIO | None = None, log_file: Path | None = AGENT_LOG, verbose: bool = False
) -> None:
    """Set up structlog for this process. `stream` receives the human or JSON log lines."""
    stream = stream if stream is not None else sys.stderr
    if log_file is not None:
        agent_log.open(log_file)
    renderer: Any
    wanted = os.environ.get("DEVPI_AGENT_LOG_FORMAT", "auto")
    if wanted == "console" or (wanted != "json" and stream.isatty()):
        renderer = structlog.dev.ConsoleRenderer(
            colors=os.environ.get("NO_COLOR") is None,
            exception_formatter=structlog.dev.plain_traceback,
        )
    else:
        renderer = structlog.processors.JSONRenderer(default=str)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact,
            _tee_to_file,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if verbose else logging.INFO
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get(name: str = "devpi-agent") -> Any:
    return structlog.get_logger(name)
