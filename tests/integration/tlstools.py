"""Real TLS peers for the integration tests (issue #8): a company PKI made with openssl, Pebble
(Let's Encrypt's ACME test server) on loopback, clients that see a test-only name, and headless
Chromium with a private CA trusted through its own NSS database.

Nothing here edits this machine's trust store or /etc/hosts: a client that must resolve the
test domain runs in its own mount namespace with its own /etc/hosts bind-mounted over the real one.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from clients import VENV_BIN, Site
from nspawn import free_port

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"


def require(*programs: str) -> None:
    """A missing prerequisite fails the test (CI installs them in .ci/run), never skips it."""
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run .ci/run or apt-get install them")


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


@dataclass(frozen=True)
class Pki:
    """A CA and what it signs, as files in `dir`."""

    dir: Path
    name: str

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    def key(self, name: str) -> Path:
        path = self.dir / f"{name}.key"
        if not path.exists():
            openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-out", path.name, cwd=self.dir)  # fmt: skip
            path.chmod(0o600)
        return path

    def issue(self, name: str, sans: str, *, key: str, days: int = 30) -> Path:
        """A server certificate for `sans` (openssl syntax); days=-1 makes one already expired."""
        csr = self.dir / f"{name}.csr"
        openssl("req", "-new", "-key", self.key(key).name, "-out", csr.name,
                "-subj", f"/CN={name}", cwd=self.dir)  # fmt: skip
        (self.dir / f"{name}.ext").write_text(
            f"subjectAltName={sans}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
        )
        openssl("x509", "-req", "-in", csr.name, "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", str(days), "-extfile", f"{name}.ext",
                "-out", f"{name}.pem", cwd=self.dir)  # fmt: skip
        return self.dir / f"{name}.pem"


def make_pki(directory: Path, name: str) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "30", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)  # fmt: skip
    return Pki(directory, name)


# --- Pebble -----------------------------------------------------------------------------------


@dataclass
class Pebble:
    """Pebble on 127.0.0.1 with validation switched off: every order is valid at once."""

    workdir: Path
    process: subprocess.Popen[bytes]
    port: int
    management_port: int
    listener_ca: Path  # signs Pebble's own HTTPS certificate: Caddy's acme_ca_root

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def issuing_root(self) -> bytes:
        """The root Pebble signs certificates with (made fresh at every start)."""
        context = ssl.create_default_context(cafile=str(self.listener_ca))
        url = f"https://127.0.0.1:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            pem: bytes = response.read()
        return pem

    def log(self) -> str:
        return (self.workdir / "pebble.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_pebble(workdir: Path, timeout: float = 30) -> Pebble:
    require("pebble", "openssl")
    pki = make_pki(workdir / "listener-pki", "pebble listener test CA")
    cert = pki.issue("pebble-listener", "IP:127.0.0.1,DNS:localhost", key="pebble-listener")
    port, management_port = free_port(), free_port()
    config = workdir / "pebble-config.json"
    config.write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": f"127.0.0.1:{port}",
                    "managementListenAddress": f"127.0.0.1:{management_port}",
                    "certificate": str(cert),
                    "privateKey": str(pki.key("pebble-listener")),
                    # Never dialled: validation is off (PEBBLE_VA_ALWAYS_VALID).
                    "httpPort": free_port(),
                    "tlsPort": free_port(),
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": False,
                }
            }
        )
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "PEBBLE_VA_ALWAYS_VALID": "1",
        "PEBBLE_VA_NOSLEEP": "1",
        "PEBBLE_WFE_NONCEREJECT": "0",
    }
    with open(workdir / "pebble.log", "wb") as log:
        process = subprocess.Popen(
            ["pebble", "-config", str(config), "-strict=false"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=workdir,
            start_new_session=True,
        )
    pebble = Pebble(workdir, process, port, management_port, pki.ca)
    context = ssl.create_default_context(cafile=str(pki.ca))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(pebble.directory_url, context=context, timeout=2):
                return pebble
        except OSError as error:
            if process.poll() is not None or time.monotonic() > deadline:
                pebble.stop()
                raise RuntimeError(f"pebble did not start: {error}\n{pebble.log()}") from None
            time.sleep(0.1)


# --- clients that resolve the test domain -----------------------------------------------------


def with_hosts(hosts_file: Path, argv: list[str]) -> list[str]:
    """argv run in a private mount namespace that sees `hosts_file` as /etc/hosts."""
    require("unshare", "mount")
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
            str(hosts_file), *argv]  # fmt: skip


def pip_install_resolving(
    site: Site, hosts_file: Path, home: Path, target: Path, *packages: str
) -> subprocess.CompletedProcess[str]:
    """pip install through the site, with its name resolved by `hosts_file`."""
    home.mkdir(parents=True, exist_ok=True)
    pip_conf = home / "pip.conf"
    pip_conf.write_text(f"[global]\nindex-url = {site.simple_url()}\n")
    pip_conf.chmod(0o600)
    env = {**site.client_env(home), "PIP_CONFIG_FILE": str(pip_conf)}
    argv = [str(VENV_BIN / "python"), "-m", "pip", "install", "--no-cache-dir",
            "--target", str(target), *packages]  # fmt: skip
    return subprocess.run(
        with_hosts(hosts_file, argv),
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# --- Chromium ---------------------------------------------------------------------------------

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
    "--enable-logging=stderr",
    "--v=0",
)


@dataclass(frozen=True)
class Browser:
    """Chromium with its own HOME, whose NSS database trusts exactly the CAs given."""

    home: Path
    resolve: dict[str, str]

    def run(self, url: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        rules = ",".join(f"MAP {name} {address}" for name, address in self.resolve.items())
        argv = ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={self.home / 'profile'}"]
        if rules:
            argv.append(f"--host-resolver-rules={rules}")
        env = {"HOME": str(self.home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        return subprocess.run(
            [*argv, *args, url],
            env=env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def make_browser(home: Path, trusted: dict[str, Path], resolve: dict[str, str]) -> Browser:
    """NSS (Chromium's trust store on Linux) reads $HOME/.pki/nssdb: a fresh one per test."""
    require("chromium", "certutil")
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run(
        ["certutil", "-d", f"sql:{nssdb}", "-N", "--empty-password"], check=True, timeout=60
    )
    for nickname, pem in trusted.items():
        subprocess.run(
            ["certutil", "-d", f"sql:{nssdb}", "-A", "-t", "C,,", "-n", nickname, "-i", str(pem)],
            check=True,
            timeout=60,
        )
    return Browser(home, resolve)


# Chromium's own log lines that say a page was not loaded cleanly.
BROWSER_PROBLEMS = (
    "Mixed Content",
    "ERR_CERT",
    "ERR_SSL",
    "Page load failed",
    "Failed to load resource",
    "net::ERR_",
    "handshake failed",
)


def browser_problems(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(p in line for p in BROWSER_PROBLEMS)]


def artifact_dir(name: str) -> Path:
    path = ARTIFACTS / name
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(ARTIFACTS, 0o755)
    return path
