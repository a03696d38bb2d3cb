"""Downloads from the internet (uv from PyPI, Caddy's signing key), retried while the network
stumbles. On a first boot the resolver can answer "Temporary failure in name resolution" for a
few seconds (CI saw it fail a first apply); a 404 or a refused certificate is not retried.

These go through a proxy when one is set (https_proxy): unlike core/direct_http.py, whose
requests are for this host's own services.
"""

from __future__ import annotations

import ssl
import time
import urllib.error
import urllib.request
from typing import Any

# Seconds between attempts: five attempts over 15 s.
RETRY_PAUSES: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
_RETRIED_HTTP = frozenset({408, 429, 500, 502, 503, 504})


class DownloadFailed(Exception):
    """The URL could not be fetched; the message names it, the error and the attempts."""


def download(
    url: str,
    *,
    log: Any,
    timeout: float,
    accept: str | None = None,
    context: ssl.SSLContext | None = None,
) -> bytes:
    """The body at `url`. Network errors and the HTTP answers of a server briefly unwell are
    retried after RETRY_PAUSES; anything else, or the last failure, raises DownloadFailed."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    pauses = RETRY_PAUSES
    for attempt in range(1, len(pauses) + 2):
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
                body: bytes = response.read()
                return body
        except OSError as error:  # URLError, HTTPError, timeouts, resets
            if not _transient(error) or attempt > len(pauses):
                tries = f" (after {attempt} attempts)" if attempt > 1 else ""
                raise DownloadFailed(f"cannot download {url}: {error}{tries}") from None
            pause = pauses[attempt - 1]
            log.info("download failed; retrying", url=url, error=str(error), pause=pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


def _transient(error: OSError) -> bool:
    if isinstance(error, urllib.error.HTTPError):
        return error.code in _RETRIED_HTTP
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    # A certificate the server shows will be the same on the next try.
    return not isinstance(reason, ssl.SSLCertVerificationError)
