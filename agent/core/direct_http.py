"""urllib without HTTP proxies, for every call to devpi (on loopback, or a replica's primary)
and to the link-local metadata service.

urllib's default opener sends requests to `http_proxy`/`https_proxy` even for 127.0.0.1 unless
`no_proxy` lists it: root's password (/+login) and users' passwords (PUT/PATCH bodies) would go
to the proxy in clear text, and the calls fail there. The variables stay set for what needs them
(apt, pip, Caddy's key download), which the runner passes on to its children.
"""

from __future__ import annotations

import ssl
import urllib.request
from http.client import HTTPResponse
from typing import cast

# An empty ProxyHandler replaces the default one, which reads the proxy environment variables.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def urlopen(
    request: urllib.request.Request | str,
    *,
    timeout: float,
    context: ssl.SSLContext | None = None,
) -> HTTPResponse:
    """urllib.request.urlopen, never through a proxy. Raises what urlopen raises."""
    opener = _OPENER
    if context is not None:
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
    return cast(HTTPResponse, opener.open(request, timeout=timeout))
