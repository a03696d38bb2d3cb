"""Caddy's admin API as an attacker on the test host sees it: an unprivileged local user tries to
read Caddy's config and to load one of its own, through whatever address the Caddyfile gives.
"""

from __future__ import annotations

import json
import re

from nspawn import NspawnHost

CADDYFILE = "/etc/caddy/Caddyfile"

# Run inside the host, as the user under test: GET /config/, then POST /load of a config that
# would serve an open site (no basic auth). Prints one JSON line per request: the HTTP status, or
# the OSError's errno name when the connection itself is refused.
_PROBE = r"""
import errno, http.client, json, socket, sys

address, port, mode = sys.argv[1], sys.argv[2], sys.argv[3]

class UnixConnection(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(address[len("unix/"):])

def request(method, path, body=None):
    if address.startswith("unix/"):
        conn, host = UnixConnection("localhost", timeout=10), ""  # Caddy wants an empty Host
    else:
        conn, host = http.client.HTTPConnection(address, timeout=10), address
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        if body is not None:
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        text = response.read(None if mode == "read" else 300).decode(errors="replace")
        return {"status": response.status, "body": text}
    except OSError as error:
        return {"error": errno.errorcode.get(error.errno or 0, repr(error))}

open_site = json.dumps({"apps": {"http": {"servers": {"attacker": {
    "listen": [":" + port],
    "routes": [{"handle": [{"handler": "static_response", "body": "owned"}]}],
}}}}}).encode()
result = {"get": request("GET", "/config/")}
if mode == "attack":
    result["load"] = request("POST", "/load", open_site)
print(json.dumps(result))
"""


def admin_address(host: NspawnHost) -> str:
    """The admin address the live Caddyfile gives (Caddy's default when it names none)."""
    text = host.path(CADDYFILE).read_text()
    match = re.search(r"^\s*admin\s+(\S+)", text, re.MULTILINE)
    return match[1] if match else "localhost:2019"


def probe(host: NspawnHost, address: str, *, user: str | None, port: int) -> dict[str, dict]:
    """What `user` (None: root) gets from the admin API at `address`."""
    argv = ["python3", "-c", _PROBE, address, str(port), "attack"]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    out = host.output(argv, timeout=60)
    result: dict[str, dict] = json.loads(out.splitlines()[-1])
    return result


def live_config(host: NspawnHost, address: str) -> str:
    """Caddy's running config as root reads it (the agent's own access must keep working)."""
    out = host.output(["python3", "-c", _PROBE, address, "0", "read"], timeout=60)
    got = json.loads(out.splitlines()[-1])["get"]
    assert got.get("status") == 200, f"root cannot read Caddy's config at {address}: {got}"
    return str(got["body"])


def assert_locked_out(host: NspawnHost, attacker_port: int, user: str = "nobody") -> str:
    """An unprivileged user can neither read nor replace Caddy's config; returns the address."""
    address = admin_address(host)
    before = live_config(host, address)
    seen = probe(host, address, user=user, port=attacker_port)
    assert seen["get"].get("error") == "EACCES", f"{user} read Caddy's config at {address}: {seen}"
    assert seen["load"].get("error") == "EACCES", f"{user} loaded a config at {address}: {seen}"
    assert live_config(host, address) == before, "Caddy's config changed under the attack"
    return address
