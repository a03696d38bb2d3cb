"""What the integration tests share: a config for a test host, running the agent inside it,
and looking at the host's processes. Every host shares this machine's network, so each gets
free ports for Caddy (HTTPS) and devpi; Caddy's admin API is each host's own unix socket (the
`admin` port is for the test of the TCP form).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from nspawn import NspawnHost, free_port

REPO = Path(__file__).resolve().parents[2]
DIST = REPO / "dist" / "devpi-agent"
AGENT = "/usr/local/sbin/devpi-agent"
CONFIG = "/etc/devpi-agent/config.toml"
# Canary passwords: they must never show up in any log, output or process list.
USER_PASSWORD = "canary-Pw-7f3a9c2e1b"
CADDY_CA = "/var/lib/caddy/.local/share/caddy/pki/authorities/local/root.crt"
PACKAGE = "devpi-agent-canary"


@dataclass
class Ports:
    https: int
    devpi: int
    admin: int

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port(), free_port())


def config_text(ports: Ports, password: str = USER_PASSWORD) -> str:
    return f"""
[server]
domain = "127.0.0.1"
https_port = {ports.https}
http_port = 0
tls = "internal"

[devpi]
port = {ports.devpi}

[[users]]
name = "devops"
password = "{password}"

[[indexes]]
name = "devops/pypi"
bases = ["root/pypi"]
"""


@dataclass
class ApplyRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def report(self) -> dict[str, object]:
        parsed: dict[str, object] = json.loads(self.stdout)
        return parsed


def apply(
    host: NspawnHost, *extra: str, config: str = CONFIG, env: dict[str, str] | None = None
) -> ApplyRun:
    started = time.monotonic()
    # cloud-init runs the agent with HOME unset; do the same.
    result = host.run(
        ["env", "-u", "HOME", AGENT, "apply", "--config", config, "--json", *extra],
        env=env,
        check=False,
        timeout=1200,
    )
    return ApplyRun(
        result.returncode,
        result.stdout.decode(errors="replace"),
        result.stderr.decode(errors="replace"),
        time.monotonic() - started,
    )


class ArgvWatcher:
    """Samples every process's argv on this machine (containers included) while a run lasts."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    try:
                        with open(f"/proc/{entry.name}/cmdline", "rb") as handle:
                            self.seen.add(
                                handle.read().replace(b"\0", b" ").decode(errors="replace")
                            )
                    except OSError:
                        pass
            self._stop.wait(0.05)

    def __enter__(self) -> ArgvWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


_PROCESSES = """
import os, pwd
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        continue
    name = os.path.basename(argv[0].decode())
    print(pwd.getpwuid(uid).pw_name, name, *[a.decode() for a in argv[1:2]])
"""


def processes(host: NspawnHost) -> list[tuple[str, str]]:
    """(user, program) of every process in the host; minbase images have no ps."""
    out = host.output(["python3", "-c", _PROCESSES])
    result = []
    for line in out.splitlines():
        user, *argv = line.split()
        # Python programs show as "python3 /path/to/script": name them by the script.
        program = (
            os.path.basename(argv[1]) if argv[0].startswith("python") and len(argv) > 1 else argv[0]
        )
        result.append((user, program))
    return result
