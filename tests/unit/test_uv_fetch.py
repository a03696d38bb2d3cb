"""agent/host/uv.py: the locked uv wheel for this machine, found on PyPI's JSON simple page,
checked against units/uv.lock, and only its binary kept. No network: `_get` is faked here."""

from __future__ import annotations

import hashlib
import io
import json
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import FakeRunner, make_ctx, reference_config

from agent.core import download
from agent.core.context import StepFailed
from agent.core.devpilock import Pin
from agent.host import uv

BINARY = b"\x7fELF pretend uv\n"


def wheel(version: str, member: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(member or f"uv-{version}.data/scripts/uv", BINARY)
        archive.writestr(f"uv-{version}.dist-info/METADATA", "Name: uv\n")
    return buffer.getvalue()


def index(version: str, files: dict[str, str]) -> dict[str, object]:
    return {
        "files": [
            {"filename": name, "url": f"https://files.example/{name}", "hashes": {"sha256": digest}}
            for name, digest in files.items()
        ]
    }


X86 = "uv-{v}-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
ARM = "uv-{v}-py3-none-manylinux_2_17_aarch64.manylinux2014_aarch64.musllinux_1_1_aarch64.whl"
MUSL = "uv-{v}-py3-none-musllinux_1_1_x86_64.whl"


def test_the_shipped_lock_pins_uv_with_a_hash_per_wheel() -> None:
    pin = uv.shipped_pin()
    assert pin.name == "uv" and len(pin.hashes) > 10
    assert uv.binary_path(pin) == Path(f"/var/cache/devpi-agent/uv/{pin.version}/uv")
    requirements = Path(__file__).resolve().parents[2] / "uv-requirements.in"
    assert f"uv=={pin.version}" in requirements.read_text(), "run `make lock-devpi`"


@pytest.mark.parametrize(("arch", "template"), [("x86_64", X86), ("aarch64", ARM)])
def test_the_manylinux_wheel_of_the_machine_is_picked(arch: str, template: str) -> None:
    pin = Pin("uv", "1.2.3", None, ("a" * 64, "b" * 64, "c" * 64), "uv==1.2.3")
    page = index(
        "1.2.3",
        {
            MUSL.format(v="1.2.3"): "c" * 64,
            X86.format(v="1.2.3"): "a" * 64,
            ARM.format(v="1.2.3"): "b" * 64,
            X86.format(v="1.2.2"): "d" * 64,
        },
    )
    name, url, digest = uv.pick_wheel(page, pin, arch)
    assert name == template.format(v="1.2.3") and url.endswith(name)
    assert digest == ("a" if arch == "x86_64" else "b") * 64


def test_a_wheel_whose_hash_the_lock_lacks_is_refused() -> None:
    pin = Pin("uv", "1.2.3", None, ("a" * 64,), "uv==1.2.3")
    page = index("1.2.3", {X86.format(v="1.2.3"): "f" * 64})
    with pytest.raises(ValueError, match="does not list"):
        uv.pick_wheel(page, pin, "x86_64")


def test_no_wheel_for_the_architecture() -> None:
    pin = Pin("uv", "1.2.3", None, ("a" * 64,), "uv==1.2.3")
    with pytest.raises(ValueError, match="architecture 'riscv64'"):
        uv.pick_wheel(index("1.2.3", {}), pin, "riscv64")
    with pytest.raises(ValueError, match=r"lists no uv-1\.2\.3-py3-none-"):
        uv.pick_wheel(index("1.2.3", {MUSL.format(v="1.2.3"): "a" * 64}), pin, "x86_64")


@pytest.fixture
def fetchable(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """A fake PyPI: the uv lock pins a wheel these bytes hash to; undoes conftest's stand-in."""
    data = wheel("9.9.9")
    digest = hashlib.sha256(data).hexdigest()
    monkeypatch.setattr(uv, "shipped_pin", lambda: Pin("uv", "9.9.9", None, (digest,), "x"))
    monkeypatch.setattr(uv, "_present", lambda ctx, path: ctx.files.exists(path))
    monkeypatch.setattr(uv, "machine", lambda: "x86_64")
    served = {
        uv.INDEX_URL: json.dumps(index("9.9.9", {X86.format(v="9.9.9"): digest})).encode(),
        "https://files.example/" + X86.format(v="9.9.9"): data,
    }
    monkeypatch.setattr(uv, "_get", lambda url, accept=None: served[url])
    return served


def test_fetch_keeps_only_the_binary_and_is_done_once(
    tmp_path: Path, fetchable: dict[str, bytes]
) -> None:
    ctx = make_ctx(tmp_path, reference_config(), FakeRunner())
    path = uv.ensure_uv(ctx)
    real = tmp_path / str(path).lstrip("/")
    assert real.read_bytes() == BINARY
    assert real.stat().st_mode & 0o777 == 0o755
    assert (real.parent.parent.stat().st_mode & 0o777) == 0o700
    assert sorted(p.name for p in real.parent.iterdir()) == ["uv"]
    assert ctx.changes == ["fetch uv 9.9.9 into /var/cache/devpi-agent/uv/9.9.9"]
    fetchable.clear()  # a second run asks nothing of the network
    again = make_ctx(tmp_path, reference_config(), FakeRunner())
    assert uv.ensure_uv(again) == path and again.changes == []


def test_a_download_that_does_not_match_the_lock_installs_nothing(
    tmp_path: Path, fetchable: dict[str, bytes]
) -> None:
    url = "https://files.example/" + X86.format(v="9.9.9")
    fetchable[url] = wheel("9.9.9") + b"tampered"
    ctx = make_ctx(tmp_path, reference_config(), FakeRunner())
    with pytest.raises(StepFailed, match=r"does not match its sha256 hash in the agent's uv\.lock"):
        uv.ensure_uv(ctx)
    assert not (tmp_path / "var/cache/devpi-agent/uv/9.9.9/uv").exists()


def test_an_unreachable_index_names_the_url(
    tmp_path: Path, fetchable: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(request: object, timeout: float, context: object) -> object:
        raise OSError("connection refused")

    monkeypatch.setattr(urllib.request, "urlopen", refused)
    monkeypatch.setattr(uv, "_get", _original_get)
    monkeypatch.setattr(download, "RETRY_PAUSES", (0.0,))
    ctx = make_ctx(tmp_path, reference_config(), FakeRunner())
    with pytest.raises(
        StepFailed,
        match=r"^cannot download https://pypi.org/simple/uv/: connection refused "
        r"\(after 2 attempts\)$",
    ):
        uv.ensure_uv(ctx)


def test_plan_fetches_nothing(tmp_path: Path, fetchable: dict[str, bytes]) -> None:
    fetchable.clear()
    ctx = make_ctx(tmp_path, reference_config(), FakeRunner(), check=True)
    uv.ensure_uv(ctx)
    assert ctx.changes == ["fetch uv 9.9.9 into /var/cache/devpi-agent/uv/9.9.9"]
    assert not (tmp_path / "var").exists()


def test_uv_never_downloads_pythons_and_uses_roots_cache() -> None:
    env = uv.uv_env()
    assert env["UV_PYTHON_DOWNLOADS"] == "never"
    assert env["UV_CACHE_DIR"] == "/var/cache/devpi-agent/uv-cache"


# The real download function, before conftest's autouse fixture stands in for it.
_original_get = uv._get
