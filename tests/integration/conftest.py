"""Fixtures for the integration tests: a cached Debian rootfs and disposable hosts.

These tests never skip: on a machine that cannot run them (not root, no
mmdebstrap/systemd-nspawn) they fail with a message saying what is missing.

A test module that sets ``SUITES = ("bookworm", "trixie")`` runs once per Debian release: its
``rootfs`` (and every fixture built on it) is made per suite, and test ids end in ``[trixie]``.
``@pytest.mark.suites("bookworm", "trixie")`` does the same for one test (its module-scoped
fixtures are then made once more, for the other suite).
Other modules run on ``DEVPI_AGENT_TEST_SUITE`` (default bookworm).
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

# The emulated arm64 host of test_arm64.py and arm64_apply.py.
from arm64host import arm64_host, arm64_rootfs  # noqa: F401
from nspawn import (
    HostError,
    HostFactory,
    NspawnHost,
    build_rootfs,
    check_host_support,
    cleanup_stale,
    default_cache_dir,
)
from rootfs import SUITES, default_suite

_HERE = Path(__file__).resolve().parent
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


def _module_marks_suites(module: object) -> bool:
    return any(
        mark.name == "suites"
        for item in vars(module).values()
        for mark in getattr(item, "pytestmark", [])
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "suite" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("suites")
    suites = marker.args if marker else getattr(metafunc.module, "SUITES", None)
    if not suites and _module_marks_suites(metafunc.module):
        # The other tests of a module where one test runs on several suites: the same
        # parameter as that test's default-suite run, so they share its module fixtures.
        suites = (default_suite(),)
    if suites:
        unknown = set(suites) - set(SUITES)
        assert not unknown, f"{metafunc.module.__name__}: unknown suites {unknown}"
        metafunc.parametrize("suite", list(suites), indirect=True, scope="module")


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


@pytest.fixture(scope="module")
def suite(request: pytest.FixtureRequest) -> str:
    """The Debian release of this module's hosts (see the module docstring)."""
    return str(getattr(request, "param", None) or default_suite())


@pytest.fixture(scope="module")
def rootfs(suite: str) -> Path:
    """The cached base rootfs of `suite` (built on first use; see rootfs.build_rootfs)."""
    problems = check_host_support()
    if problems:
        pytest.fail(
            "integration tests cannot run on this machine: " + "; ".join(problems),
            pytrace=False,
        )
    cleanup_stale()
    t0 = time.monotonic()
    try:
        path = build_rootfs(default_cache_dir(), suite=suite)
    except HostError as exc:
        pytest.fail(f"building the test rootfs failed: {exc}", pytrace=False)
    print(f"{suite} rootfs {path} ready in {time.monotonic() - t0:.1f}s")
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
