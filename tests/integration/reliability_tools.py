"""Helpers of the reliability tier (test_reliability.py): running the agent with the crash hook,
a host fingerprint to compare two converged hosts, latency figures, and the results file that
tools/reliability_table.py turns into docs/reliability.md.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import bcrypt
from agenthost import AGENT, CONFIG, REPO, ApplyRun
from nspawn import NspawnHost

RESULTS = REPO / "test-artifacts" / "reliability.json"
BCRYPT_HASH = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")


def record(section: str, data: Mapping[str, Any]) -> None:
    """Merge one section into test-artifacts/reliability.json (read by reliability_table.py)."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[section] = dict(data)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def run_agent(
    host: NspawnHost,
    *extra: str,
    env: Mapping[str, str] | None = None,
    config: str = CONFIG,
    timeout: float = 1200,
) -> ApplyRun:
    """`devpi-agent apply --json` as cloud-init runs it (no HOME), with extra environment."""
    assignments = [f"{key}={value}" for key, value in (env or {}).items()]
    started = time.monotonic()
    result = host.run(
        ["env", "-u", "HOME", *assignments, AGENT, "apply", "--config", config, "--json", *extra],
        check=False,
        timeout=timeout,
    )
    return ApplyRun(
        result.returncode,
        result.stdout.decode(errors="replace"),
        result.stderr.decode(errors="replace"),
        time.monotonic() - started,
    )


def canary_forms(user: str, password: str) -> list[str]:
    """A password as it could leak: plain, URL-encoded, and inside a Basic auth header."""
    return sorted(
        {
            password,
            urllib.parse.quote(password, safe=""),
            base64.b64encode(f"{user}:{password}".encode()).decode(),
        }
    )


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p95/max (nearest rank), rounded to milliseconds."""
    ordered = sorted(values)
    if not ordered:
        return {}

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {
        "n": len(ordered),
        "p50": round(rank(50), 3),
        "p90": round(rank(90), 3),
        "p95": round(rank(95), 3),
        "max": round(ordered[-1], 3),
    }


def devpi_json(port: int, path: str = "/", body: Any = None) -> tuple[int, Any]:
    """devpi on the host's loopback (the hosts share this machine's network)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        headers={"Accept": "application/json", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, {}


# Runs inside the host: every file under /etc with type, mode, owner and a digest of its
# content, bcrypt hashes replaced by a placeholder (salts differ) and, in the files the agent
# writes, ports by their names. Only there: a random port can equal a number in a stock file
# (adduser.conf's LAST_UID=59999 did once).
_ETC_SCRIPT = r"""
import hashlib, json, os, re, stat, sys, pwd, grp
ports = json.loads(sys.argv[1])
skip = set(json.loads(sys.argv[2]))
meta_only = set(json.loads(sys.argv[3]))
port_bearing = tuple(json.loads(sys.argv[4]))
port_numbers = [
    (re.compile(rb"(?<![0-9])%d(?![0-9])" % port), f"<{label}>".encode())
    for label, port in ports.items()
]
bcrypt_hash = re.compile(rb"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
out = {}
for top in ("/etc",):
    for directory, dirs, files in os.walk(top):
        dirs.sort()
        for name in sorted(dirs) + sorted(files):
            path = os.path.join(directory, name)
            if path in skip:
                continue
            st = os.lstat(path)
            owner = f"{pwd.getpwuid(st.st_uid).pw_name}:{grp.getgrgid(st.st_gid).gr_name}"
            meta = f"{stat.filemode(st.st_mode)} {owner}"
            if stat.S_ISLNK(st.st_mode):
                meta += " -> " + os.readlink(path)
            elif stat.S_ISREG(st.st_mode) and path not in meta_only:
                data = open(path, "rb").read()
                data = bcrypt_hash.sub(b"<bcrypt>", data)
                if path.startswith(port_bearing):
                    for number, placeholder in port_numbers:
                        data = number.sub(placeholder, data)
                meta += " " + hashlib.sha256(data).hexdigest()[:16]
            out[path] = meta
print(json.dumps(out))
"""

# Files that differ between any two hosts whatever the agent does.
ETC_SKIP = ("/etc/hostname", "/etc/machine-id", "/etc/resolv.conf", "/etc/.pwd.lock")
# Files whose content is random per host: only their type, mode and owner are compared.
ETC_META_ONLY = ("/etc/devpi-agent/root.pass",)
# Where the agent (or the test, for the config) writes ports.
ETC_PORT_BEARING = (
    "/etc/caddy/",
    "/etc/devpi-agent/",
    "/etc/devpi-server/",
    "/etc/supervisor/conf.d/",
    "/etc/systemd/system/devpi-agent",
)


def fingerprint(
    host: NspawnHost, ports: Mapping[str, int], users: Mapping[str, str]
) -> dict[str, Any]:
    """What a converged host is, comparable between hosts with different ports.

    ports: name -> port as configured now; users: devpi user -> password (checked, not shown).
    """
    port_map = dict(ports)
    prints: dict[str, Any] = {}
    prints["etc"] = json.loads(
        host.output(
            [
                "python3",
                "-c",
                _ETC_SCRIPT,
                json.dumps(port_map),
                json.dumps(ETC_SKIP),
                json.dumps(ETC_META_ONLY),
                json.dumps(ETC_PORT_BEARING),
            ]
        )
    )
    caddyfile = host.path("/etc/caddy/Caddyfile").read_text()
    hashes = {
        line.split()[0]: line.split()[1]
        for line in caddyfile.splitlines()
        if BCRYPT_HASH.search(line) and len(line.split()) == 2
    }
    prints["caddy_users"] = sorted(hashes)
    prints["caddy_hashes_verify"] = {
        name: bcrypt.checkpw(users[name].encode(), hashes[name].encode())
        for name in hashes
        if name in users
    }
    prints["packages"] = host.output(
        ["dpkg-query", "-W", "-f=${Package} ${Version} ${db:Status-Abbrev}\n"]
    ).splitlines()
    prints["dpkg_audit"] = host.output(["dpkg", "--audit"])
    venv_python = "/opt/devpi-agent/venv/bin/python"
    # uv made the venv: no pip in it. What is installed, from the dist-infos; uv's own check.
    listing = (
        "import importlib.metadata as m; "
        "print(*sorted(f'{d.name}=={d.version}' for d in m.distributions()), sep='\\n')"
    )
    prints["venv"] = host.output([venv_python, "-c", listing]).splitlines()
    from agent.host.uv import binary_path, shipped_pin  # the repo is on sys.path by now

    uv = str(binary_path(shipped_pin()))
    prints["venv_check"] = host.run(
        [uv, "pip", "check", "--python", venv_python], check=False
    ).returncode
    prints["var_lib"] = host.output(
        [
            "find",
            "/var/lib/devpi",
            "/var/lib/devpi-agent",
            "-maxdepth",
            "2",
            "-not",
            "-path",
            "/var/lib/devpi/server/*",
            "-printf",
            "%p %y %m %u:%g\n",
        ]
    ).splitlines()
    prints["leftovers"] = host.output(
        [
            "sh",
            "-c",
            "ls -d /usr/sbin/policy-rc.d /var/lib/devpi/server.init "
            "/etc/caddy/.Caddyfile.devpi-agent-candidate /etc/*/.*.tmp /etc/*/*/.*.tmp "
            "2>/dev/null; true",
        ]
    )
    services = {}
    for unit in ("supervisor", "caddy"):
        active = host.run(["systemctl", "is-active", unit], check=False).stdout.decode().strip()
        enabled = host.run(["systemctl", "is-enabled", unit], check=False).stdout.decode().strip()
        services[unit] = f"{active}/{enabled}"
    status = host.run(
        ["supervisorctl", "-c", "/etc/supervisor/supervisord.conf", "status"], check=False
    )
    services["supervisor programs"] = sorted(
        " ".join(line.split()[:2]) for line in status.stdout.decode().splitlines()
    )
    services["failed units"] = host.output(
        ["systemctl", "list-units", "--failed", "--no-legend", "--plain"]
    )
    prints["services"] = services
    prints["listening"] = _listening(host, port_map)
    status, tree = devpi_json(port_map["devpi"])
    prints["devpi"] = _devpi_tree(tree) if status == 200 else f"GET / answered {status}"
    prints["devpi_logins"] = {
        name: devpi_json(port_map["devpi"], "/+login", {"user": name, "password": password})[0]
        for name, password in users.items()
    }
    return prints


def _devpi_tree(payload: Any) -> dict[str, Any]:
    volatile = {"created", "modified", "last_modified", "serial"}
    tree: dict[str, Any] = {}
    for user, info in sorted(payload["result"].items()):
        indexes = {
            name: {k: v for k, v in sorted(config.items()) if k not in volatile}
            for name, config in sorted((info.get("indexes") or {}).items())
        }
        tree[user] = indexes
    return tree


def _listening(host: NspawnHost, ports: Mapping[str, int]) -> list[str]:
    """This host's listening sockets, by port name (hosts share one network namespace)."""
    by_port = {port: name for name, port in ports.items()}
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in host.output(["cat", table]).splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            address, port_hex = fields[1].rsplit(":", 1)
            port = int(port_hex, 16)
            if port in by_port:
                loopback = address in ("0100007F", "00000000000000000000000001000000")
                scope = "loopback" if loopback else "any" if set(address) == {"0"} else address
                found.add(f"{by_port[port]} {scope}")
    return sorted(found)


def diff_fingerprints(one: Mapping[str, Any], two: Mapping[str, Any]) -> list[str]:
    """Human-readable differences, for an assertion message."""
    problems = []
    for key in sorted(set(one) | set(two)):
        a, b = one.get(key), two.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    problems.append(f"{key}[{sub}]: {a.get(sub)!r} != {b.get(sub)!r}")
        elif isinstance(a, list) and isinstance(b, list):
            only_a = sorted(set(map(str, a)) - set(map(str, b)))
            only_b = sorted(set(map(str, b)) - set(map(str, a)))
            problems.append(f"{key}: only in one {only_a[:10]}, only in other {only_b[:10]}")
        else:
            problems.append(f"{key}: {a!r} != {b!r}")
    return problems


def scan_for(root: Path, needles: Sequence[str]) -> tuple[dict[Path, list[str]], int, int]:
    """Every file under `root` holding one of `needles` (bytes compared); also file and byte
    counts scanned. Symlinks are not followed."""
    encoded = [(n, n.encode()) for n in needles]
    hits: dict[Path, list[str]] = {}
    files = size = 0
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        files += 1
        size += len(data)
        found = [needle for needle, raw in encoded if raw in data]
        if found:
            hits[path] = found
    return hits, files, size


HOLD_DPKG_LOCK = """
import fcntl, os, sys, time
handle = open("/var/lib/dpkg/lock-frontend", "w")
fcntl.lockf(handle, fcntl.LOCK_EX)
with open("/run/dpkg-lock-holder.pid", "w") as pid:
    pid.write(str(os.getpid()))
time.sleep(float(sys.argv[1]))
"""
