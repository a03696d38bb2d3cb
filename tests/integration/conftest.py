"""Fixtures for the integration tests: a cached Debian rootfs and disposable hosts.

These tests never skip: on a machine that cannot run them (not root, no
mmdebstrap/systemd-nspawn) they fail with a message saying what is missing.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from nspawn import (
    HostError,
    HostFactory,
    NspawnHost,
    build_rootfs,
    check_host_support,
    cleanup_stale,
    default_cache_dir,
)

_HERE = Path(__file__).resolve().parent
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test below this directory is an integration test.
    for item in items:
        if _HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _test_failed(node: pytest.Item) -> bool:
    reports = node.stash.get(_REPORTS, {})
    return any(r.failed for r in reports.values())


@pytest.fixture(scope="session")
def rootfs() -> Path:
    """The cached base rootfs (built on first use; see nspawn.build_rootfs)."""
    problems = check_host_support()
    if problems:
        pytest.fail(
            "integration tests cannot run on this machine: " + "; ".join(problems),
            pytrace=False,
        )
    cleanup_stale()
    t0 = time.monotonic()
    try:
        path = build_rootfs(default_cache_dir())
    except HostError as exc:
        pytest.fail(f"building the test rootfs failed: {exc}", pytrace=False)
    print(f"rootfs {path} ready in {time.monotonic() - t0:.1f}s")
    return path


@pytest.fixture
def make_host(rootfs: Path, request: pytest.FixtureRequest) -> Iterator[HostFactory]:
    """Factory for started hosts: ``make_host()`` boots systemd,
    ``make_host(systemd=False)`` gives a host without an init system,
    ``make_host(start=False)`` only prepares the rootfs (call ``.start()`` later).
    All hosts are stopped (and their rootfs removed) at teardown; if the test
    failed, their console log and journal are printed first."""
    hosts: list[NspawnHost] = []

    def factory(*, systemd: bool = True, start: bool = True) -> NspawnHost:
        host = NspawnHost(rootfs)
        hosts.append(host)
        host.prepare()
        if start:
            host.start(systemd=systemd)
        return host

    yield factory

    node = request.node
    failed = isinstance(node, pytest.Item) and _test_failed(node)
    errors: list[str] = []
    for host in reversed(hosts):
        if failed:
            try:
                print(host.debug_report())
            except Exception as exc:  # debugging aid only; never mask the teardown
                print(f"debug report for {host.machine} failed: {exc}")
        try:
            host.stop()
        except HostError as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail("stopping test hosts failed: " + "; ".join(errors), pytrace=False)
