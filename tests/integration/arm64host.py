"""An aarch64 (Graviton-like) Debian 12 host on this x86_64 machine: an arm64 rootfs made with
mmdebstrap and run under systemd-nspawn without an init system, every arm64 binary executed by
qemu-user-static through binfmt_misc (rootfs.ensure_binfmt mounts binfmt_misc and enables the
qemu-aarch64 entry if this machine lacks them; the test fails, naming what is missing, if it
cannot). Shared by test_arm64.py (in `make test`) and arm64_apply.py (`make arm64-apply`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agenthost import AGENT, DIST
from nspawn import HostError, NspawnHost, check_host_support, default_cache_dir
from rootfs import build_rootfs, ensure_binfmt

ARCH = "arm64"
SUITE = "bookworm"


@pytest.fixture(scope="module")
def arm64_rootfs() -> Path:
    problems = check_host_support()
    if not DIST.exists():
        problems.append(f"{DIST} is missing: run `make dist` first")
    if not problems:
        problems = ensure_binfmt(ARCH)
    if problems:
        pytest.fail("arm64 hosts cannot run here: " + "; ".join(problems), pytrace=False)
    started = time.monotonic()
    try:
        path = build_rootfs(default_cache_dir(), suite=SUITE, arch=ARCH)
    except HostError as error:
        pytest.fail(f"building the arm64 rootfs failed: {error}", pytrace=False)
    print(f"arm64 rootfs {path} ready in {time.monotonic() - started:.1f}s")
    return path


@pytest.fixture(scope="module")
def arm64_host(arm64_rootfs: Path) -> Iterator[NspawnHost]:
    """A started arm64 host (no init system) with dist/devpi-agent installed."""
    host = NspawnHost(arm64_rootfs)
    try:
        host.prepare()
        host.copy_in(DIST, AGENT, mode=0o755)
        host.start(systemd=False, timeout=300)
        yield host
    except BaseException:
        print(host.debug_report())
        raise
    finally:
        host.stop()
