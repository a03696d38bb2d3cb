"""Downloads from the internet are retried while the network stumbles, and only then.

urllib's urlopen is faked; the pauses are shortened to nothing."""

from __future__ import annotations

import io
import socket
import ssl
import urllib.error
from typing import Any

import pytest

from agent.core import download as dl

URL = "https://pypi.org/simple/uv/"


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


def serve(monkeypatch: pytest.MonkeyPatch, *answers: object) -> list[str]:
    """urlopen answers in turn: an exception is raised, bytes are the body."""
    asked: list[str] = []
    queue = list(answers)

    def urlopen(request: Any, timeout: float, context: object) -> object:
        asked.append(request.full_url)
        answer = queue.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, bytes)
        return io.BytesIO(answer)

    monkeypatch.setattr(dl.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(dl, "RETRY_PAUSES", (0.0, 0.0, 0.0))
    return asked


def http_error(code: int) -> urllib.error.HTTPError:
    return urllib.error.HTTPError(URL, code, "status", {}, None)  # type: ignore[arg-type]


def test_a_first_boots_dns_hiccup_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    # What CI saw on a fresh host: the resolver not ready for a few seconds.
    dns = urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))
    asked = serve(monkeypatch, dns, dns, b"index")
    log = Log()
    assert dl.download(URL, log=log, timeout=5) == b"index"
    assert len(asked) == 3
    assert [event for event, _ in log.lines] == ["download failed; retrying"] * 2
    assert "Temporary failure in name resolution" in log.lines[0][1]["error"]


@pytest.mark.parametrize("code", [429, 502, 503])
def test_a_server_briefly_unwell_is_retried(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    asked = serve(monkeypatch, http_error(code), b"ok")
    assert dl.download(URL, log=Log(), timeout=5) == b"ok"
    assert len(asked) == 2


@pytest.mark.parametrize(
    "error",
    [http_error(404), http_error(403), urllib.error.URLError(ssl.SSLCertVerificationError("bad"))],
    ids=["404", "403", "certificate"],
)
def test_what_a_retry_cannot_change_fails_at_once(
    monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    asked = serve(monkeypatch, error, b"never")
    with pytest.raises(dl.DownloadFailed, match=r"^cannot download https://pypi\.org/simple/uv/: "):
        dl.download(URL, log=Log(), timeout=5)
    assert len(asked) == 1


def test_the_last_failure_names_the_url_and_the_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = ConnectionRefusedError(111, "Connection refused")
    asked = serve(monkeypatch, *[refused] * 4)
    with pytest.raises(dl.DownloadFailed) as failed:
        dl.download(URL, log=Log(), timeout=5)
    assert len(asked) == 4
    assert str(failed.value) == (
        f"cannot download {URL}: [Errno 111] Connection refused (after 4 attempts)"
    )
