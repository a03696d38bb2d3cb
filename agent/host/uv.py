"""uv, the installer of devpi's venv: one pinned version, fetched from PyPI with its hash checked.

units/uv.lock (from uv-requirements.in, `make lock-devpi`) holds the pin and the sha256 of every
wheel of that version. The wheel for this machine's architecture is found through PyPI's JSON
simple API (PEP 691), downloaded, checked against the lock, and only its `uv` binary is kept, at
a path named by the version. uv needs nothing apt installs: it makes venvs without python3-venv,
so the venv step can run while apt works (core/engine.py's early steps).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import ssl
import tempfile
import zipfile
from pathlib import Path

from agent.core import log
from agent.core.context import Context, StepFailed
from agent.core.devpilock import Pin, parse_lock
from agent.core.download import DownloadFailed, download
from agent.core.files import fsync_dir
from agent.core.paths import SYSTEM_CA_BUNDLE
from agent.core.resources import units_dir

SHIPPED_LOCK = "uv.lock"
INDEX_URL = "https://pypi.org/simple/uv/"
# Root-only: what is here runs as root.
UV_DIR = Path("/var/cache/devpi-agent/uv")
CACHE_DIR = Path("/var/cache/devpi-agent/uv-cache")
# The manylinux wheels (glibc 2.17+, every Debian and Ubuntu the agent supports).
_WHEEL_PLATFORMS = {"x86_64": "manylinux_2_17_x86_64", "aarch64": "manylinux_2_17_aarch64"}
_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}
_JSON = "application/vnd.pypi.simple.v1+json"


def shipped_pin() -> Pin:
    """The one pin of units/uv.lock."""
    pins = parse_lock((units_dir() / SHIPPED_LOCK).read_text())
    if len(pins) != 1 or pins[0].name != "uv":
        raise ValueError(f"{SHIPPED_LOCK} must pin exactly uv, not {[p.name for p in pins]}")
    return pins[0]


def binary_path(pin: Pin) -> Path:
    return UV_DIR / pin.version / "uv"


def machine() -> str:
    arch = platform.machine().lower()
    return _ARCH_ALIASES.get(arch, arch)


def pick_wheel(index: dict[str, object], pin: Pin, arch: str) -> tuple[str, str, str]:
    """(file name, URL, sha256) of the wheel of `pin` for `arch`, from a PEP 691 project page.

    Only a file whose sha256 the lock lists is taken; ValueError says what is missing."""
    wanted = _WHEEL_PLATFORMS.get(arch)
    if wanted is None:
        raise ValueError(
            f"no uv wheel for this machine's architecture {arch!r} "
            f"(the agent supports {', '.join(sorted(_WHEEL_PLATFORMS))})"
        )
    prefix = f"uv-{pin.version}-py3-none-"
    files = index.get("files")
    for entry in files if isinstance(files, list) else []:
        name = str(entry.get("filename", ""))
        if not (name.startswith(prefix) and name.endswith(".whl") and wanted in name):
            continue
        digest = str((entry.get("hashes") or {}).get("sha256", ""))
        if digest not in pin.hashes:
            raise ValueError(
                f"{name} on the index has sha256 {digest or 'unknown'}, which the agent's "
                f"{SHIPPED_LOCK} does not list"
            )
        return name, str(entry["url"]), digest
    raise ValueError(f"the index lists no {prefix}*{wanted}*.whl")


def _tls() -> ssl.SSLContext:
    # The OS trust store, so a company CA added with update-ca-certificates works here too.
    if SYSTEM_CA_BUNDLE.exists():
        return ssl.create_default_context(cafile=str(SYSTEM_CA_BUNDLE))
    return ssl.create_default_context()


def _get(url: str, accept: str | None = None) -> bytes:
    try:
        return download(url, log=log.get(), timeout=120, accept=accept, context=_tls())
    except DownloadFailed as error:
        raise StepFailed(str(error)) from None


def _present(ctx: Context, path: Path) -> bool:
    return ctx.files.exists(path)


def ensure_uv(ctx: Context) -> Path:
    """The path of the locked uv binary, fetched first if it is not there yet."""
    pin = shipped_pin()
    path = binary_path(pin)
    if _present(ctx, path):
        return path
    if not ctx.change(f"fetch uv {pin.version} into {path.parent}"):
        return path
    try:
        name, url, digest = pick_wheel(json.loads(_get(INDEX_URL, _JSON)), pin, machine())
    except ValueError as error:
        raise StepFailed(f"cannot fetch uv {pin.version} from {INDEX_URL}: {error}") from None
    data = _get(url)
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise StepFailed(
            f"{url} does not match its sha256 hash in the agent's {SHIPPED_LOCK} "
            f"(expected {digest}, got {actual}): nothing was installed"
        )
    ctx.log.info("uv fetched", wheel=name, bytes=len(data))
    ctx.files.ensure_parent(UV_DIR, mode=0o755)
    ctx.files.ensure_dir(UV_DIR, mode=0o700, record=False)
    ctx.files.ensure_dir(path.parent, mode=0o755, record=False)
    real = ctx.files.host_path(path)
    _unpack_binary(data, f"uv-{pin.version}.data/scripts/uv", real)
    return path


def _unpack_binary(wheel: bytes, member: str, target: Path) -> None:
    """Only the uv binary, written beside its place and renamed into it (atomic)."""
    with tempfile.TemporaryFile() as handle:
        handle.write(wheel)
        handle.seek(0)
        with zipfile.ZipFile(handle) as archive:
            try:
                source = archive.open(member)
            except KeyError:
                raise StepFailed(f"the uv wheel holds no {member}") from None
            fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=".uv.", suffix=".tmp")
            try:
                with source, os.fdopen(fd, "wb") as out:
                    while chunk := source.read(1 << 20):
                        out.write(chunk)
                    out.flush()
                    os.fchmod(out.fileno(), 0o755)
                    os.fsync(out.fileno())
                os.replace(temp_name, target)
            except BaseException:
                Path(temp_name).unlink(missing_ok=True)
                raise
    fsync_dir(target.parent)


def uv_env() -> dict[str, str]:
    """uv's settings for the agent's runs: root's cache, no downloads of Pythons, no progress
    bars, the OS trust store (a company CA added with update-ca-certificates)."""
    env = {
        "UV_CACHE_DIR": str(CACHE_DIR),
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_NO_PROGRESS": "1",
        "UV_NO_MODIFY_PATH": "1",
    }
    if SYSTEM_CA_BUNDLE.exists():
        env["SSL_CERT_FILE"] = str(SYSTEM_CA_BUNDLE)
    return env
