"""The real clients, driven from outside the test host: twine, pip and uv through Caddy.

Credentials go into the files the README tells users to write (.pypirc, pip.conf) or into the
environment (UV_DEFAULT_INDEX), never into argv.
"""

from __future__ import annotations

import base64
import hashlib
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@dataclass(frozen=True)
class Site:
    """The server as a client sees it."""

    host: str
    port: int
    index: str
    user: str
    password: str
    ca_bundle: Path

    @property
    def base(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def index_url(self) -> str:
        return f"{self.base}/{self.index}/"

    def simple_url(self, *, credentials: bool = True) -> str:
        if not credentials:
            return f"{self.base}/{self.index}/+simple/"
        user = urllib.parse.quote(self.user, safe="")
        password = urllib.parse.quote(self.password, safe="")
        return f"https://{user}:{password}@{self.host}:{self.port}/{self.index}/+simple/"

    def client_env(self, home: Path) -> dict[str, str]:
        """A clean environment trusting the site's CA (this machine's variables would win)."""
        env = {
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_INPUT": "1",
        }
        for name in ("REQUESTS_CA_BUNDLE", "PIP_CERT", "SSL_CERT_FILE", "CURL_CA_BUNDLE"):
            env[name] = str(self.ca_bundle)
        return env


def make_ca_bundle(ca_cert: Path, out: Path) -> Path:
    """The system bundle plus the site's CA, as one file every client accepts."""
    out.write_bytes(SYSTEM_BUNDLE.read_bytes() + b"\n" + ca_cert.read_bytes())
    return out


def http_get(
    site: Site, path: str, *, auth: tuple[str, str] | None, accept: str = "*/*"
) -> tuple[int, str]:
    status, _, body = http_fetch(site, path, auth=auth, headers={"Accept": accept})
    return status, body.decode("utf-8", "replace")


def http_fetch(
    site: Site, path: str, *, auth: tuple[str, str] | None, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and the body as sent: urllib decodes no encoding."""
    request = urllib.request.Request(site.base + path, headers=headers)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    context = ssl.create_default_context(cafile=str(site.ca_bundle))
    try:
        with urllib.request.urlopen(request, context=context, timeout=60) as response:
            return response.status, _lower(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, _lower(error.headers), error.read()


def _lower(headers: Message) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def build_wheel(directory: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel, made by hand: no build backend to download."""
    dist = name.replace("-", "_")
    module = f"{dist}/__init__.py".encode()
    files: dict[str, bytes] = {
        f"{dist}/__init__.py": f'__version__ = "{version}"\n'.encode(),
        f"{dist}-{version}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
            "Summary: devpi-agent integration test package\n"
        ).encode(),
        f"{dist}-{version}.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: devpi-agent-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    assert module
    record_lines = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record_lines.append(f"{path},sha256={digest},{len(data)}")
    record = f"{dist}-{version}.dist-info/RECORD"
    record_lines.append(f"{record},,")
    files[record] = ("\n".join(record_lines) + "\n").encode()
    wheel = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


def run(
    argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def twine_upload(site: Site, wheel: Path, home: Path) -> subprocess.CompletedProcess[str]:
    pypirc = home / ".pypirc"
    pypirc.write_text(
        "[distutils]\nindex-servers = devpi\n\n"
        f"[devpi]\nrepository = {site.index_url}\n"
        f"username = {site.user}\npassword = {site.password}\n"
    )
    os.chmod(pypirc, 0o600)
    return run(
        [str(VENV_BIN / "twine"), "upload", "--non-interactive", "-r", "devpi", str(wheel)],
        site.client_env(home),
        home,
    )


def pip_install(
    site: Site, home: Path, target: Path, *packages: str
) -> subprocess.CompletedProcess[str]:
    pip_conf = home / "pip.conf"
    pip_conf.write_text(f"[global]\nindex-url = {site.simple_url()}\n")
    env = {**site.client_env(home), "PIP_CONFIG_FILE": str(pip_conf)}
    return run(
        [
            str(VENV_BIN / "python"),
            "-m",
            "pip",
            "install",
            "--no-cache-dir",
            "--target",
            str(target),
            *packages,
        ],
        env,
        home,
    )


def uv_install(
    site: Site, home: Path, target: Path, *packages: str
) -> subprocess.CompletedProcess[str]:
    env = {**site.client_env(home), "UV_DEFAULT_INDEX": site.simple_url(), "UV_NO_CACHE": "1"}
    return run(
        [str(VENV_BIN / "uv"), "pip", "install", "--target", str(target), *packages],
        env,
        home,
    )
