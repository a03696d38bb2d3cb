"""Host names in URLs and Caddy site addresses."""

from __future__ import annotations


def url_host(host: str) -> str:
    """`host` as it stands before a port: an IPv6 address in brackets, anything else as it is."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
