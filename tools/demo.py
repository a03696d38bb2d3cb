"""`make demo`: converge a throwaway Debian 12 container, print a ready-to-paste pip command.

    tools/demo.py up     boot a container (systemd-nspawn), run dist/devpi-agent apply inside
    tools/demo.py down   stop the container and delete it

The container keeps running after `up` returns: a small keeper process owns it until `down`.
It shares this machine's network, so the server answers on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

STATE_DIR = Path("/var/lib/devpi-agent-demo")
STATE = STATE_DIR / "state.json"
AGENT = "/usr/local/sbin/devpi-agent"
CONFIG = "/etc/devpi-agent/config.toml"
CADDY_CA = "/var/lib/caddy/.local/share/caddy/pki/authorities/local/root.crt"
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
os.environ.setdefault("DEVPI_AGENT_TEST_WORKDIR", str(STATE_DIR / "hosts"))

from nspawn import (  # noqa: E402
    NspawnHost,
    build_rootfs,
    check_host_support,
    cleanup_stale,
    default_cache_dir,
    free_port,
)


def config_text(https_port: int, devpi_port: int, admin_port: int, password: str) -> str:
    return f"""# devpi-agent demo config (inside the demo container at {CONFIG})
[server]
domain = "127.0.0.1"
https_port = {https_port}
http_port = 0
tls = "internal"
caddy_admin = "127.0.0.1:{admin_port}"

[devpi]
port = {devpi_port}

[[users]]
name = "devops"
password = "{password}"

[[indexes]]
name = "devops/pypi"
bases = ["root/pypi"]
"""


def _port(preferred: int) -> int:
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()


def keeper(ready_fd: int) -> None:
    """Runs in the background: owns the container until SIGTERM."""
    stopping = False

    def on_term(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    host = NspawnHost(build_rootfs(default_cache_dir()), name="devpi-agent-demo")
    status: dict[str, object] = {"pid": os.getpid()}
    try:
        password = secrets.token_urlsafe(12)
        https_port, devpi_port, admin_port = _port(8443), free_port(), free_port()
        host.prepare()
        host.copy_in(REPO / "dist" / "devpi-agent", AGENT, mode=0o755)
        host.write(CONFIG, config_text(https_port, devpi_port, admin_port, password), mode=0o600)
        host.start(systemd=True)
        started = time.monotonic()
        # The agent's own log lines go straight to the terminal that ran `make demo`.
        result = host.run(
            ["env", "-u", "HOME", AGENT, "apply", "--config", CONFIG], check=False, timeout=1800
        )
        sys.stderr.buffer.write(result.stderr)
        sys.stdout.buffer.write(result.stdout)
        sys.stderr.flush()
        sys.stdout.flush()
        bundle = STATE_DIR / "ca-bundle.pem"
        ca = host.path(CADDY_CA)
        if ca.exists():
            bundle.write_bytes(SYSTEM_BUNDLE.read_bytes() + b"\n" + ca.read_bytes())
            (STATE_DIR / "caddy-root.crt").write_bytes(ca.read_bytes())
        status.update(
            returncode=result.returncode,
            seconds=round(time.monotonic() - started, 1),
            https_port=https_port,
            password=password,
            bundle=str(bundle),
            rootfs=str(host.root),
            leader=host.pid,
        )
    except Exception as error:  # reported to the `up` process, which prints it
        status.update(returncode=1, error=f"{type(error).__name__}: {error}")
    STATE.write_text(json.dumps(status))
    STATE.chmod(0o600)
    # Let go of the terminal (or pipe): `make demo | tee log` must end when `up` does.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.write(ready_fd, b"x")
    os.close(ready_fd)
    while not stopping and status.get("returncode") == 0:
        signal.pause()
    host.stop()
    STATE.unlink(missing_ok=True)


def up() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (sudo make demo): it boots a container", file=sys.stderr)
        return 3
    problems = check_host_support()
    if problems:
        for problem in problems:
            print(f"make demo: {problem}", file=sys.stderr)
        return 3
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    if STATE.exists():
        print("a demo is already running; `sudo make demo-stop` first", file=sys.stderr)
        return 3
    cleanup_stale()
    read_fd, write_fd = os.pipe()
    if os.fork() == 0:
        os.setsid()
        os.close(read_fd)
        if os.fork() == 0:
            keeper(write_fd)
        os._exit(0)
    os.close(write_fd)
    os.read(read_fd, 1)
    status = json.loads(STATE.read_text())
    if status.get("returncode") != 0:
        print(f"demo failed: {status.get('error', 'apply exited non-zero')}", file=sys.stderr)
        STATE.unlink(missing_ok=True)
        return 1
    port, password, bundle = status["https_port"], status["password"], status["bundle"]
    index = f"https://devops:{password}@127.0.0.1:{port}/devops/pypi/+simple/"
    print(
        f"""
devpi-agent demo is up: apply took {status["seconds"]} s.
  web UI    https://127.0.0.1:{port}/devops/pypi  (user devops, password {password})
  CA        {STATE_DIR}/caddy-root.crt (tls internal); system + CA bundle: {bundle}

Install through it (the bundle trusts the demo's CA; REQUESTS_CA_BUNDLE, where a shell
exports it, would override PIP_CERT, so both are set):
  PIP_CERT={bundle} REQUESTS_CA_BUNDLE={bundle} pip install --index-url {index} six

Upload with twine (README: ~/.pypirc), or uv:
  SSL_CERT_FILE={bundle} UV_DEFAULT_INDEX={index} uv pip install six

Re-run the agent inside (changes nothing):  sudo nsenter -t {status["leader"]} -a {AGENT} apply
Stop and delete it:  sudo make demo-stop
"""
    )
    return 0


def down() -> int:
    if not STATE.exists():
        print("no demo is running")
        return 0
    pid = json.loads(STATE.read_text())["pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        STATE.unlink(missing_ok=True)
        cleanup_stale()
        return 0
    deadline = time.monotonic() + 60
    while STATE.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    print("demo stopped and deleted")
    return 0


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "up"
    sys.exit({"up": up, "down": down}[command]())
