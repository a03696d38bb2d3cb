"""Fixtures for the VM tier: the cached Debian cloud images, dist/ served over HTTP on the
host's loopback (the guest reaches it at 10.0.2.2), user data rendered by the built agent's own
`devpi-agent user-data`, and VMs that are always stopped.

A module that sets ``SUITES = ("bookworm", "trixie")`` runs once per Debian release (its
module fixtures, VMs included, are made per release; test ids end in ``[trixie]``); others run on
bookworm. ``VARIANT = "first-boot"`` boots the Ubuntu-like image (vmimage.py says what it adds);
``DEVPI_AGENT_VM_VARIANT`` overrides a module's variant for a whole run (``plain`` to measure
the plain image). Modules without either boot bookworm's plain image.

These tests never skip: on a machine that cannot run them they fail and say what is missing.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
REPO = _HERE.parents[1]
# The integration tier's real clients (twine, pip, uv) and port picker are reused as they are.
sys.path.insert(0, str(REPO / "tests" / "integration"))

from qemu import VM, VMError, make_seed, remove_workdir  # noqa: E402
from vmimage import (  # noqa: E402
    REQUIRED_TOOLS,
    SUITE,
    SUITES,
    VARIANT,
    VARIANTS,
    Image,
    ImageError,
    build_image,
)

DIST = REPO / "dist" / "devpi-agent"
CACHE_DIR = Path(os.environ.get("DEVPI_AGENT_TEST_CACHE") or "/var/cache/devpi-agent-tests")
QEMU_TOOLS = ("qemu-system-x86_64", "cloud-localds")
# The slirp address of the host's loopback, as the guest sees it.
HOST_FROM_GUEST = "10.0.2.2"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.vm)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "suite" in metafunc.fixturenames:
        suites = getattr(metafunc.module, "SUITES", (SUITE,))
        unknown = set(suites) - set(SUITES)
        assert not unknown, f"{metafunc.module.__name__}: unknown suites {unknown}"
        metafunc.parametrize("suite", list(suites), indirect=True, scope="module")


@pytest.fixture(scope="module")
def suite(request: pytest.FixtureRequest) -> str:
    """The Debian release of this module's VMs (see the module docstring)."""
    return str(getattr(request, "param", None) or SUITE)


@pytest.fixture(scope="module")
def variant(request: pytest.FixtureRequest) -> str:
    """The image variant of this module's VMs: plain or first-boot (Ubuntu-like)."""
    chosen = os.environ.get("DEVPI_AGENT_VM_VARIANT") or getattr(request.module, "VARIANT", VARIANT)
    assert chosen in VARIANTS, f"DEVPI_AGENT_VM_VARIANT={chosen!r}: not one of {VARIANTS}"
    return str(chosen)


@pytest.fixture(scope="module")
def vm_image(suite: str, variant: str) -> Image:
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (mmdebstrap --mode=root)")
    missing = [t for t in (*REQUIRED_TOOLS, *QEMU_TOOLS) if shutil.which(t) is None]
    if missing:
        problems.append(
            f"missing {', '.join(missing)} (apt-get install mmdebstrap e2fsprogs "
            "qemu-system-x86 cloud-image-utils)"
        )
    if not DIST.exists():
        problems.append(f"{DIST} is missing: run `make dist` first")
    if problems:
        pytest.fail("VM tests cannot run here: " + "; ".join(problems), pytrace=False)
    started = time.monotonic()
    try:
        image = build_image(CACHE_DIR, suite, variant)
    except ImageError as error:
        pytest.fail(f"building the {suite} {variant} VM image failed: {error}", pytrace=False)
    seconds = time.monotonic() - started
    print(f"{suite} {variant} VM image {image.disk.parent} ready in {seconds:.1f}s")
    return image


@dataclass
class AgentServer:
    """dist/devpi-agent (a snapshot) over HTTP on 127.0.0.1; records every request path."""

    directory: Path
    port: int = 0
    requests: list[str] = field(default_factory=list)

    @property
    def agent(self) -> Path:
        return self.directory / "devpi-agent"

    @property
    def guest_url(self) -> str:
        return f"http://{HOST_FROM_GUEST}:{self.port}/devpi-agent"

    def downloads(self) -> int:
        return sum(1 for path in self.requests if path == "/devpi-agent")


@pytest.fixture(scope="session")
def agent_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentServer]:
    directory = tmp_path_factory.mktemp("served-dist")
    shutil.copy2(DIST, directory / "devpi-agent")
    served = AgentServer(directory)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            served.requests.append(self.path)

    handler = functools.partial(Handler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    served.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served
    server.shutdown()
    server.server_close()
    thread.join()


def render_user_data(agent: Path, *options: str) -> str:
    """User data exactly as a person gets it: the built agent's `user-data` command."""
    result = subprocess.run(
        [str(agent), "user-data", *options],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


VMFactory = Callable[..., VM]


@pytest.fixture(scope="module")
def make_vm(tmp_path_factory: pytest.TempPathFactory, vm_image: Image) -> Iterator[VMFactory]:
    """``make_vm(user_data, forwards={host: guest})`` starts a VM; all are stopped at the end,
    with their serial console printed if anything went wrong."""
    vms: list[VM] = []

    def factory(user_data: str, *, forwards: dict[int, int], **kwargs: int) -> VM:
        workdir = tmp_path_factory.mktemp("vm")
        seed = make_seed(workdir, user_data, f"iid-devpi-agent-{workdir.name}")
        vm = VM(vm_image, workdir, seed, forwards=forwards, **kwargs)
        vms.append(vm)
        vm.start()
        return vm

    yield factory
    for vm in vms:
        try:
            vm.stop()
        except (VMError, OSError) as error:
            print(f"stopping {vm.dir}: {error}")
        remove_workdir(vm.dir)


def console_on_failure(vm: VM) -> str:
    return f"\n----- serial console of {vm.dir} (tail) -----\n{vm.console_tail()}"
