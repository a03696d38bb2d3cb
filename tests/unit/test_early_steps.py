"""The engine's early steps: a step whose can_start_early says so runs from the start of the run,
beside the steps before it (the venv builds while apt installs), and is reported in its place."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import FakeRunner, make_ctx, reference_config

from agent.core import paths
from agent.core.context import Context, Step, StepFailed
from agent.core.engine import run_steps
from agent.host import venv as host_venv
from agent.steps import STEPS

BOUND = 10.0  # seconds: every wait below ends long before this unless the engine is wrong


def step(name: str, fn: Callable[[Context], None], early: bool = False) -> Step:
    return Step(name, fn, name, (lambda ctx: True) if early else None)


def wait_thread_gone(name: str) -> None:
    deadline = time.monotonic() + BOUND
    while any(t.name == name for t in threading.enumerate()):
        assert time.monotonic() < deadline, f"thread {name} still running"
        time.sleep(0.01)


def test_an_early_step_runs_beside_the_steps_before_it(tmp_path: Path) -> None:
    began = threading.Event()
    seen: list[str] = []

    def earlier(ctx: Context) -> None:
        # Only an early step that already runs can set this while this step waits.
        seen.append(f"early began: {began.wait(BOUND)}")

    def builds(ctx: Context) -> None:
        began.set()
        ctx.change("built")

    ctx = make_ctx(tmp_path, reference_config(), FakeRunner())
    report = run_steps(ctx, [step("apt", earlier), step("venv", builds, early=True)])
    assert seen == ["early began: True"]
    assert [(s.name, s.status, s.early) for s in report.steps] == [
        ("apt", "ok", False),
        ("venv", "changed", True),
    ]
    assert report.steps[1].changes == ["built"]
    assert report.as_json()["steps"][1]["early"] is True
    assert "early" not in report.as_json()["steps"][0]


def test_each_step_keeps_its_own_file_changes(tmp_path: Path) -> None:
    release = threading.Event()

    def earlier(ctx: Context) -> None:
        ctx.write(Path("/etc/apt-file"), "a\n", mode=0o644)
        release.set()

    def builds(ctx: Context) -> None:
        assert release.wait(BOUND)
        ctx.write(Path("/etc/venv-file"), "v\n", mode=0o644)

    ctx = make_ctx(tmp_path, reference_config(), FakeRunner())
    report = run_steps(ctx, [step("apt", earlier), step("venv", builds, early=True)])
    assert [[c.path for c in s.file_changes] for s in report.steps] == [
        [Path("/etc/apt-file")],
        [Path("/etc/venv-file")],
    ]
    assert {c.path for c in report.file_changes} == {Path("/etc/apt-file"), Path("/etc/venv-file")}


def test_pending_markers_are_shared_with_later_steps(tmp_path: Path) -> None:
    seen: list[bool] = []

    def builds(ctx: Context) -> None:
        ctx.mark_pending(paths.DEVPI_RESTART)

    def later(ctx: Context) -> None:
        seen.append(ctx.is_pending(paths.DEVPI_RESTART))

    ctx = make_ctx(tmp_path, reference_config(), FakeRunner())
    run_steps(
        ctx, [step("apt", lambda c: None), step("venv", builds, early=True), step("s", later)]
    )
    assert seen == [True]


def test_an_early_failure_stops_the_run_before_the_next_step(tmp_path: Path) -> None:
    ran: list[str] = []
    apt_runs = threading.Event()

    def builds(ctx: Context) -> None:
        assert apt_runs.wait(BOUND)
        raise StepFailed("no network")

    def first(ctx: Context) -> None:
        apt_runs.set()
        wait_thread_gone("early-steps")  # the early step has failed by the time this returns
        ran.append("first")

    def second(ctx: Context) -> None:
        ran.append("second")

    ctx = make_ctx(tmp_path, reference_config(), FakeRunner())
    report = run_steps(
        ctx,
        [
            step("apt", first),
            step("tls", second),
            step("venv", builds, early=True),
            step("z", second),
        ],
    )
    assert ran == ["first"]
    assert [(s.name, s.status) for s in report.steps] == [("apt", "ok"), ("venv", "failed")]
    assert report.steps[1].error == "no network"
    assert report.skipped == ["tls", "z"]


def test_a_failure_before_it_waits_for_the_early_step(tmp_path: Path) -> None:
    release = threading.Event()
    finished: list[str] = []

    def fails(ctx: Context) -> None:
        release.set()
        raise StepFailed("apt broke")

    def builds(ctx: Context) -> None:
        assert release.wait(BOUND)
        time.sleep(0.05)  # still running when the engine sees apt fail
        ctx.change("built")
        finished.append("venv")

    ctx = make_ctx(tmp_path, reference_config(), FakeRunner())
    report = run_steps(
        ctx, [step("apt", fails), step("tls", lambda c: None), step("venv", builds, early=True)]
    )
    assert finished == ["venv"]
    assert [(s.name, s.status) for s in report.steps] == [("apt", "failed"), ("venv", "changed")]
    assert report.skipped == ["tls"]


def test_plan_starts_nothing_early(tmp_path: Path) -> None:
    threads: list[str] = []

    def builds(ctx: Context) -> None:
        threads.append(threading.current_thread().name)

    ctx = make_ctx(tmp_path, reference_config(), FakeRunner(), check=True)
    report = run_steps(ctx, [step("apt", lambda c: None), step("venv", builds, early=True)])
    assert threads == [threading.main_thread().name]
    assert [s.early for s in report.steps] == [False, False]


def test_the_venv_step_starts_early_only_on_a_first_build(tmp_path: Path) -> None:
    config = reference_config()
    venv_step = next(s for s in STEPS if s.name == "venv")
    assert venv_step.can_start_early is not None
    ctx: Any = make_ctx(tmp_path, config, FakeRunner())
    # uv needs nothing apt installs.
    assert venv_step.can_start_early(ctx)
    assert ctx.runner.calls == []
    # An export/import upgrade in flight puts the old venv back first.
    record = ctx.files.host_path(paths.UPGRADE_RECORD)
    record.parent.mkdir(parents=True)
    record.write_text("{}")
    assert not host_venv.builds_beside_earlier_steps(ctx)
    record.unlink()
    # A build cut short is done again in order.
    ctx.mark_pending(paths.VENV_BUILD)
    assert not host_venv.builds_beside_earlier_steps(ctx)
    ctx.clear_pending(paths.VENV_BUILD)
    assert host_venv.builds_beside_earlier_steps(ctx)
    # An existing venv may be upgraded by the upgrade step, which runs before it.
    python = ctx.files.host_path(config.devpi.venv / "bin" / "python")
    python.parent.mkdir(parents=True)
    python.write_text("")
    assert not host_venv.builds_beside_earlier_steps(ctx)


def test_the_first_builds_chain_is_user_venv_config_init() -> None:
    early = [s for s in STEPS if s.can_start_early is not None]
    assert [s.name for s in early] == ["service-user", "venv", "devpi-config", "devpi-init"]
    # One condition for all: none may start early without the ones it needs.
    assert len({s.can_start_early.__code__.co_names for s in early if s.can_start_early}) == 1


def test_early_steps_run_one_after_another_in_order(tmp_path: Path) -> None:
    order: list[str] = []
    apt_may_finish = threading.Event()

    def apt(ctx: Context) -> None:
        assert apt_may_finish.wait(BOUND)
        order.append("apt")

    def early(name: str) -> Callable[[Context], None]:
        def run(ctx: Context) -> None:
            order.append(name)
            if name == "init":
                apt_may_finish.set()

        return run

    ctx = make_ctx(tmp_path, reference_config(), FakeRunner())
    report = run_steps(
        ctx,
        [
            step("apt", apt),
            step("user", early("user"), early=True),
            step("upgrade", lambda c: order.append("upgrade")),
            step("venv", early("venv"), early=True),
            step("init", early("init"), early=True),
        ],
    )
    assert order == ["user", "venv", "init", "apt", "upgrade"]
    assert [s.name for s in report.steps] == ["apt", "user", "upgrade", "venv", "init"]


def test_an_early_failure_stops_the_chain(tmp_path: Path) -> None:
    ran: list[str] = []
    apt_runs = threading.Event()

    def fails(ctx: Context) -> None:
        assert apt_runs.wait(BOUND)
        raise StepFailed("no network")

    def apt(ctx: Context) -> None:
        apt_runs.set()
        wait_thread_gone("early-steps")

    ctx = make_ctx(tmp_path, reference_config(), FakeRunner())
    report = run_steps(
        ctx,
        [
            step("apt", apt),
            step("venv", fails, early=True),
            step("init", lambda c: ran.append("init"), early=True),
            step("later", lambda c: ran.append("later")),
        ],
    )
    assert ran == []
    assert [(s.name, s.status) for s in report.steps] == [("apt", "ok"), ("venv", "failed")]
    assert report.skipped == ["init", "later"]


def test_a_failure_in_order_starts_no_further_early_step(tmp_path: Path) -> None:
    venv_runs = threading.Event()
    release = threading.Event()
    ran: list[str] = []

    def builds(ctx: Context) -> None:
        venv_runs.set()
        assert release.wait(BOUND)
        ran.append("venv")

    def fails(ctx: Context) -> None:
        assert venv_runs.wait(BOUND)
        release.set()
        raise StepFailed("apt broke")

    ctx = make_ctx(tmp_path, reference_config(), FakeRunner())
    report = run_steps(
        ctx,
        [
            step("apt", fails),
            step("venv", builds, early=True),
            step("init", lambda c: ran.append("init"), early=True),
        ],
    )
    # The running one finishes; the one after it never starts (unless it already had).
    assert ran[0] == "venv"
    assert [(s.name, s.status) for s in report.steps][:2] == [("apt", "failed"), ("venv", "ok")]
    assert "init" in report.skipped or ran == ["venv", "init"]
