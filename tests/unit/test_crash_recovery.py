"""A run killed anywhere: the crash test hook itself, and what the next run finds and repairs.

A kill is simulated by making the step's crash point (or a command) raise Killed, a BaseException
that no step catches; the next run is a fresh Context over the same files, as after a real crash.
The real thing (SIGKILL at >= 15 points on a real host) is tests/integration/test_reliability.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ACTIVE_AND_ENABLED,
    REPO_ROOT,
    Call,
    FakeRunner,
    make_ctx,
    reference_data,
    result,
    uv_pip,
    uv_venv,
)

from agent.core import crashpoint as crash
from agent.core import paths
from agent.core.config import DEFAULT_CADDY_ADMIN, parse
from agent.core.engine import run_steps
from agent.core.files import render
from agent.core.runner import Result
from agent.host import supervisor as host_supervisor
from agent.host import venv as host_venv
from agent.steps import Step, StepFailed, apt, caddy, devpi_config, supervisor, venv


class Killed(BaseException):
    """The process died here: nothing after this line ran, nothing catches it."""


def dies_at(point: str) -> Callable[..., None]:
    def hook(name: str, output: str | None = None) -> None:
        if name == point and output is None:
            raise Killed(point)

    return hook


def config() -> Any:
    return parse(reference_data())


def under(root: Path, path: Path | str) -> Path:
    return root / str(path).lstrip("/")


# --- the hook ---------------------------------------------------------------------------------


def test_unset_hook_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(crash.CRASH_AT, raising=False)
    crash.crashpoint("caddy:written")
    crash.crashpoint("run:pip install", "Installing collected packages: six")


def test_hook_raises_at_the_named_point_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(crash.CRASH_AT, "caddy:written")
    monkeypatch.setenv(crash.CRASH_MODE, "raise")
    crash.crashpoint("caddy:after")
    crash.crashpoint("caddy:written", "output lines never match a step point")
    with pytest.raises(crash.CrashPointReached, match="caddy:written"):
        crash.crashpoint("caddy:written")


def test_hook_matches_command_output(monkeypatch: pytest.MonkeyPatch) -> None:
    def killed() -> None:
        raise Killed("the process tree")

    monkeypatch.setattr(crash, "_kill_process_tree", killed)
    monkeypatch.setenv(crash.CRASH_AT, "run:pip install~Installing collected")
    # raise mode is for steps only: an output line is read in another thread, so it kills
    monkeypatch.setenv(crash.CRASH_MODE, "raise")
    crash.crashpoint("run:pip install")
    crash.crashpoint("run:pip install", "Collecting devpi-server==6.20.3")
    crash.crashpoint("run:apt-get install", "Installing collected packages")
    with pytest.raises(Killed):
        crash.crashpoint("run:pip install", "Installing collected packages: six, devpi")


_VICTIM = """
import subprocess, sys
from agent.core.crashpoint import crashpoint
child = subprocess.Popen(
    ["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True
)
grandchild = child.stdout.readline().strip()
print(child.pid, grandchild, flush=True)
crashpoint("caddy:written")
print("survived", flush=True)
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _killed_at_caddy_written(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The script run as the agent with the hook set to caddy:written, which it reaches."""
    env = {**os.environ, crash.CRASH_AT: "caddy:written", "PYTHONPATH": str(REPO_ROOT)}
    env.pop(crash.CRASH_MODE, None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_hook_kills_the_agent_and_everything_it_started() -> None:
    victim = _killed_at_caddy_written(_VICTIM)
    assert victim.returncode == -9, victim.stderr
    assert "survived" not in victim.stdout
    child, grandchild = (int(pid) for pid in victim.stdout.split())
    deadline = time.monotonic() + 10
    while not (_gone(child) and _gone(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child) and _gone(grandchild), "a process the agent started outlived it"


_RACING_VICTIM = """
import sys, threading, time
from pathlib import Path
from agent.core import crashpoint as crash
from agent.core.runner import ShRunner

marker = sys.argv[1]
go = threading.Event()
# An early step's thread, about to start a command when the kill comes.
threading.Thread(
    target=lambda: (go.wait(), ShRunner().run(["sleep", marker], timeout=600)), daemon=True
).start()
collect = crash._children_by_parent

def collect_then_let_the_other_thread_start_one():
    tree = collect()
    go.set()
    # The command starts (or, with the kill holding the runner, never does) after the tree
    # was collected: the window in which an early step's command escaped the kill.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and not _started(marker):
        time.sleep(0.02)
    return tree

def _started(text):
    for stat in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in stat.read_bytes():
                return True
        except OSError:
            pass
    return False

crash._children_by_parent = collect_then_let_the_other_thread_start_one
crash.crashpoint("caddy:written")
print("survived", flush=True)
"""


def _pids_running(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes() and not _gone(int(cmdline.parent.name)):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def test_hook_leaves_no_command_another_thread_was_starting() -> None:
    # Found by the crash test: killed at apt:before, the early steps' useradd outlived the agent.
    marker = f"{300 + os.getpid() % 1000}.{time.monotonic_ns() % 10**6}"
    try:
        victim = _killed_at_caddy_written(_RACING_VICTIM, marker)
        assert victim.returncode == -9, victim.stderr
        assert "survived" not in victim.stdout
        assert _pids_running(f"sleep\0{marker}") == [], "a command outlived the kill"
    finally:
        for pid in _pids_running(f"sleep\0{marker}"):
            os.kill(pid, 9)


def test_hook_with_a_delay_lets_the_run_go_on_then_kills_it() -> None:
    script = (
        "import time\nfrom agent.core.crashpoint import crashpoint\n"
        "crashpoint('venv:created')\nprint('went on', flush=True)\n"
        "crashpoint('venv:created')\ntime.sleep(30)\nprint('survived', flush=True)\n"
    )
    env = {
        **os.environ,
        crash.CRASH_AT: "venv:created",
        crash.CRASH_DELAY: "0.5",
        "PYTHONPATH": str(REPO_ROOT),
    }
    env.pop(crash.CRASH_MODE, None)
    started = time.monotonic()
    victim = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert victim.returncode == -9, victim.stderr
    assert victim.stdout == "went on\n"
    assert time.monotonic() - started < 20


def test_engine_calls_the_hook_around_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(crash.CRASH_AT, "second:before")
    monkeypatch.setenv(crash.CRASH_MODE, "raise")
    ran: list[str] = []
    steps = [
        Step(name, lambda ctx, name=name: ran.append(name), name)
        for name in ("first", "second", "third")
    ]
    report = run_steps(make_ctx(tmp_path, config(), FakeRunner()), steps)
    assert ran == ["first"]
    assert [s.status for s in report.steps] == ["ok", "failed"]
    assert "CrashPointReached" in (report.steps[1].error or "")
    assert report.skipped == ["third"]


# --- venv -------------------------------------------------------------------------------------

VENV = Path("/opt/devpi-agent/venv")


def make_venv(root: Path, *, python: bool = True, pins: bool = True) -> None:
    venv_dir = under(root, VENV)
    (venv_dir / "bin").mkdir(parents=True, exist_ok=True)
    (venv_dir / "pyvenv.cfg").write_text("home = /usr/bin\n")
    if python:
        (venv_dir / "bin/python").write_text("")
    site = venv_dir / "lib/python3.11/site-packages"
    site.mkdir(parents=True, exist_ok=True)
    if pins:
        for dist in ("devpi_server-6.20.3", "devpi_web-5.1.1", "devpi_client-7.3.0"):
            (site / f"{dist}.dist-info").mkdir(exist_ok=True)


def venv_runner(root: Path) -> FakeRunner:
    """`uv venv` makes an empty venv (--clear empties it); `uv pip install` installs the pins."""

    def make(call: Call) -> Result:
        if "--clear" in call.argv:
            shutil.rmtree(under(root, VENV))
        make_venv(root, pins=False)
        return result(call.argv)

    def pip(call: Call) -> Result:
        make_venv(root)
        return result(call.argv)

    runner = FakeRunner()
    runner.on(uv_venv, make)
    runner.on(uv_pip("install"), pip)
    return runner


def test_pip_killed_midway_means_a_fresh_venv_next_run(tmp_path: Path) -> None:
    make_venv(tmp_path, pins=False)

    def killed(call: Call) -> Result:
        # uv got as far as the dist-info of every pin, but not through their files.
        make_venv(tmp_path)
        raise Killed("uv")

    runner = FakeRunner().on(uv_pip("install"), killed)
    with pytest.raises(Killed):
        venv.converge(make_ctx(tmp_path, config(), runner))
    assert host_venv.missing_pins(make_ctx(tmp_path, config(), FakeRunner())) == []

    runner = venv_runner(tmp_path)
    ctx = make_ctx(tmp_path, config(), runner)
    venv.converge(ctx)
    assert uv_venv(runner.calls[0]) and runner.calls[0].argv[-2:] == ("--clear", str(VENV))
    assert uv_pip("install")(runner.calls[1])
    assert ctx.is_pending("devpi-server-restart")
    assert not ctx.is_pending(paths.VENV_BUILD)

    again = venv_runner(tmp_path)
    venv.converge(make_ctx(tmp_path, config(), again))
    assert again.calls == []


def test_venv_creation_killed_is_redone(tmp_path: Path) -> None:
    """`uv venv` killed after it made the python. Next run: made again."""

    def killed(call: Call) -> Result:
        make_venv(tmp_path, pins=False)
        raise Killed("uv venv")

    runner = FakeRunner().on(uv_venv, killed)
    with pytest.raises(Killed):
        venv.converge(make_ctx(tmp_path, config(), runner))

    runner = venv_runner(tmp_path)
    ctx = make_ctx(tmp_path, config(), runner)
    venv.converge(ctx)
    assert uv_venv(runner.calls[0]) and runner.calls[0].argv[-2:] == ("--clear", str(VENV))
    assert ctx.changes[0] == f"create venv {VENV} again (the last build was cut short)"


def test_venv_without_python_is_made_again(tmp_path: Path) -> None:
    make_venv(tmp_path, python=False)
    runner = venv_runner(tmp_path)
    venv.converge(make_ctx(tmp_path, config(), runner))
    assert uv_venv(runner.calls[0]) and runner.calls[0].argv[-2:] == ("--clear", str(VENV))
    assert uv_pip("install")(runner.calls[1])


def test_venv_never_clears_a_directory_that_is_no_venv(tmp_path: Path) -> None:
    precious = under(tmp_path, VENV / "notes.txt")
    precious.parent.mkdir(parents=True)
    precious.write_text("not a venv")
    runner = venv_runner(tmp_path)
    venv.converge(make_ctx(tmp_path, config(), runner))
    assert uv_venv(runner.calls[0]) and "--clear" not in runner.calls[0].argv
    assert runner.calls[0].argv[-1] == str(VENV)


def test_venv_check_mode_reports_the_rebuild_and_changes_nothing(tmp_path: Path) -> None:
    make_venv(tmp_path)
    make_ctx(tmp_path, config(), FakeRunner()).mark_pending(paths.VENV_BUILD)
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, config(), runner, check=True)
    venv.converge(ctx)
    assert runner.calls == []
    assert ctx.changes == [
        f"create venv {VENV} again (the last build was cut short)",
        f"install 74 locked packages from the lock shipped in the agent ({VENV}/devpi-agent.lock)",
    ]
    assert under(tmp_path, "var/lib/devpi-agent/pending/venv-build").exists()


# --- a config written, the service not yet told -----------------------------------------------


def test_devpi_config_written_then_killed_still_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devpi_config, "crashpoint", dies_at("devpi-config:written"))
    with pytest.raises(Killed):
        devpi_config.converge(make_ctx(tmp_path, config(), FakeRunner()))
    assert under(tmp_path, paths.DEVPI_CONFIG_FILE).exists()
    monkeypatch.undo()
    ctx = make_ctx(tmp_path, config(), FakeRunner())
    devpi_config.converge(ctx)
    assert ctx.changes == []
    assert ctx.is_pending(paths.DEVPI_RESTART)


CADDY_VERSION = "v2.6.2 h1:QnKDiR6UQkOWZSvJ1Ws6LLbCfNkOT3OBWDJo7xFTZe8=\n"


def caddy_runner() -> FakeRunner:
    runner = FakeRunner()
    runner.on(["caddy", "version"], stdout=CADDY_VERSION)
    runner.on(["systemctl", "show"], stdout=ACTIVE_AND_ENABLED)
    return runner


def test_caddyfile_written_then_killed_is_reloaded_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(caddy, "BCRYPT_ROUNDS", 4)
    monkeypatch.setattr(caddy, "wait_for_https", lambda ctx, timeout=30: None)
    live = under(tmp_path, caddy.CADDYFILE)
    live.parent.mkdir(parents=True)
    old = "# the Caddyfile with the old password\n"
    live.write_text(f"{{\n\tadmin {DEFAULT_CADDY_ADMIN}\n}}\n{old}")
    monkeypatch.setattr(caddy, "crashpoint", dies_at("caddy:written"))
    first = caddy_runner()
    with pytest.raises(Killed):
        caddy.converge(make_ctx(tmp_path, config(), first))
    assert "basicauth" in live.read_text()
    assert first.ran(["caddy", "reload"]) == []

    monkeypatch.setattr(caddy, "crashpoint", crash.crashpoint)
    second = caddy_runner()
    ctx = make_ctx(tmp_path, config(), second)
    caddy.converge(ctx)
    assert len(second.ran(["caddy", "reload"])) == 1
    assert ctx.changes == ["reload caddy"]
    assert not ctx.is_pending(paths.CADDY_RELOAD)


def test_supervisor_program_written_then_killed_is_updated_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # supervisord knows the program, with its old definition.
    monkeypatch.setattr(host_supervisor, "program_state", lambda ctx, program: "RUNNING")
    path = under(tmp_path, paths.SUPERVISOR_PROGRAMS_DIR / "devpi-server.conf")
    path.parent.mkdir(parents=True)
    path.write_text("[program:devpi-server]\ncommand=/old\n")
    monkeypatch.setattr(host_supervisor, "crashpoint", dies_at("supervisor:devpi-server-written"))
    ctx = make_ctx(tmp_path, config(), FakeRunner())
    with pytest.raises(Killed):
        host_supervisor.ensure_program(ctx, "devpi-server", supervisor.program_content(ctx))

    monkeypatch.setattr(host_supervisor, "crashpoint", crash.crashpoint)
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, config(), runner)
    assert host_supervisor.ensure_program(ctx, "devpi-server", supervisor.program_content(ctx))
    assert [c.argv[3:] for c in runner.calls] == [("reread",), ("update", "devpi-server")]
    assert not ctx.is_pending("supervisor-update-devpi-server")

    quiet = FakeRunner()
    host_supervisor.ensure_program(
        make_ctx(tmp_path, config(), quiet), "devpi-server", supervisor.program_content(ctx)
    )
    assert quiet.calls == []


# --- apt killed mid-install -------------------------------------------------------------------


def dpkg_query(*missing: str) -> str:
    return "".join(
        f"{name}\t{'iU ' if name in missing else 'ii '}\t1.0-1\n" for name in apt.PACKAGES
    )


def fresh_lists(root: Path) -> None:
    lists = under(root, apt.LISTS_DIR)
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages").write_text("x")


def test_interrupted_dpkg_is_finished_with_services_held(tmp_path: Path) -> None:
    fresh_lists(tmp_path)
    journal = under(tmp_path, apt.DPKG_UPDATES)
    journal.mkdir(parents=True)
    (journal / "0003").write_text("Package: caddy\n")
    policy = under(tmp_path, apt.POLICY_RC_D)
    held_during: list[bool] = []

    def configure(call: Call) -> Result:
        held_during.append(policy.read_text() == render("policy-rc.d.j2"))
        (journal / "0003").unlink()
        # a package left half-unpacked: dpkg says so and fails; apt-get install reinstalls it
        return result(call.argv, rc=1, stderr="dpkg: error processing package caddy")

    runner = FakeRunner()
    runner.on(["dpkg", "--force-confdef", "--force-confold", "--configure", "-a"], configure)
    runner.on(["dpkg-query"], stdout=dpkg_query("caddy"), times=1)
    runner.on(["dpkg-query"], stdout=dpkg_query())
    ctx = make_ctx(tmp_path, config(), runner)
    apt.converge(ctx)
    assert held_during == [True]
    assert not policy.exists()
    assert ctx.changes == [
        "finish an interrupted dpkg run (dpkg --configure -a)",
        "install caddy",
    ]
    assert [c.argv[0] for c in runner.calls] == ["dpkg", "dpkg-query", "apt-get", "dpkg-query"]


def test_dpkg_scratch_files_are_no_interruption(tmp_path: Path) -> None:
    journal = under(tmp_path, apt.DPKG_UPDATES)
    journal.mkdir(parents=True)
    (journal / "tmp.i").write_text("")
    assert not apt.dpkg_interrupted(make_ctx(tmp_path, config(), FakeRunner()))


def test_update_killed_midway_is_redone_though_lists_look_fresh(tmp_path: Path) -> None:
    fresh_lists(tmp_path)

    def killed(call: Call) -> Result:
        raise Killed("apt-get update")

    runner = FakeRunner().on(["dpkg-query"], stdout=dpkg_query("caddy"))
    runner.on(lambda c: c.argv[0] == "apt-get" and c.argv[-1] == "update", killed)
    ctx = make_ctx(tmp_path, config(), runner)
    # lists are fresh, so no update: force one to be under way when the kill comes
    ctx.mark_pending(paths.APT_LISTS)
    with pytest.raises(Killed):
        apt.converge(ctx)

    runner = FakeRunner()
    runner.on(["dpkg-query"], stdout=dpkg_query("caddy"), times=1)
    runner.on(["dpkg-query"], stdout=dpkg_query())
    ctx = make_ctx(tmp_path, config(), runner)
    apt.converge(ctx)
    assert ctx.changes == ["refresh apt package lists", "install caddy"]
    assert not ctx.is_pending(paths.APT_LISTS)


@pytest.mark.parametrize(
    ("stderr", "holder"),
    [
        (
            "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 4242 "
            "(python3)\nE: Unable to acquire the dpkg frontend lock (/var/lib/dpkg/lock-frontend)"
            ", is another process using it?\n",
            "process 4242 (python3)",
        ),
        (
            "E: Could not get lock /var/lib/dpkg/lock-frontend - open (11: Resource "
            "temporarily unavailable)\n",
            "another process",
        ),
    ],
)
def test_dpkg_lock_held_too_long_names_the_lock(tmp_path: Path, stderr: str, holder: str) -> None:
    fresh_lists(tmp_path)
    runner = FakeRunner().on(["dpkg-query"], stdout=dpkg_query("caddy"))
    runner.on(["apt-get"], rc=100, stderr=stderr)
    data = reference_data()
    data["apt"] = {"lock_timeout": 7}
    with pytest.raises(StepFailed) as failure:
        apt.converge(make_ctx(tmp_path, parse(data), runner))
    message = str(failure.value)
    assert f"/var/lib/dpkg/lock-frontend is held by {holder}" in message
    assert "apt.lock_timeout = 7 s" in message
    assert not under(tmp_path, apt.POLICY_RC_D).exists()


def test_other_apt_failures_are_not_mistaken_for_the_lock(tmp_path: Path) -> None:
    fresh_lists(tmp_path)
    runner = FakeRunner().on(["dpkg-query"], stdout=dpkg_query("caddy"))
    runner.on(["apt-get"], rc=100, stderr="E: Unable to locate package caddy\n")
    with pytest.raises(Exception, match="Unable to locate package caddy") as failure:
        apt.converge(make_ctx(tmp_path, config(), runner))
    assert not isinstance(failure.value, StepFailed)
