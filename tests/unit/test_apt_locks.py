"""apt's and dpkg's locks (issue #14): apt-get update does not wait for the lists lock and fails at
once while apt-daily holds it, so the agent waits for every lock itself, bounded by
apt.lock_timeout, names the holder when it gives up, and suspends needrestart; on Ubuntu a package
apt cannot find gets a hint about universe."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
from conftest import UBUNTU_2404, FakeRunner, make_ctx, reference_data

from agent.core.config import Config, parse
from agent.core.context import StepFailed
from agent.host import apt

PROC_LOCKS = """\
1: POSIX  ADVISORY  WRITE 72 fd:01:1234 0 EOF
2: OFDLCK ADVISORY  READ  -1 fd:01:99 0 EOF
2: -> POSIX  ADVISORY  WRITE 80 fd:01:1234 0 EOF
3: FLOCK  ADVISORY  WRITE 91 00:1b:5555 0 EOF
"""


def config(lock_timeout: int = 600) -> Config:
    data = reference_data()
    data["apt"] = {"lock_timeout": lock_timeout}
    return parse(data)


def test_proc_locks_name_each_holder_once() -> None:
    # The waiter (->) is not a holder; an OFD lock names no process (-1) but counts.
    assert apt.parse_proc_locks(PROC_LOCKS) == {1234: 72, 99: -1, 5555: 91}


def test_lock_holders_reads_the_kernels_view(tmp_path: Path) -> None:
    root, proc = tmp_path / "root", tmp_path / "proc"
    lists_lock = root / "var/lib/apt/lists/lock"
    lists_lock.parent.mkdir(parents=True)
    lists_lock.touch()
    inode = lists_lock.stat().st_ino
    (proc / "72").mkdir(parents=True)
    (proc / "72/cmdline").write_bytes(b"/usr/bin/python3\0/usr/bin/unattended-upgrade\0")
    (proc / "locks").write_text(f"1: POSIX  ADVISORY  WRITE 72 fd:01:{inode} 0 EOF\n")
    holders = apt.lock_holders(root, proc)
    assert [(h.lock, h.pid) for h in holders] == [(Path("/var/lib/apt/lists/lock"), 72)]
    assert str(holders[0]) == (
        "/var/lib/apt/lists/lock is held by process 72 "
        "(/usr/bin/python3 /usr/bin/unattended-upgrade)"
    )


def test_a_real_fcntl_lock_is_seen_as_apt_holds_it(tmp_path: Path) -> None:
    """apt locks with fcntl (lockf); a lock taken so by another process shows up."""
    lock = tmp_path / "var/lib/apt/lists/lock"
    lock.parent.mkdir(parents=True)
    locked_r, locked_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: lock, say so, hold until told
        with open(lock, "w") as handle:
            fcntl.lockf(handle, fcntl.LOCK_EX)
            os.write(locked_w, b"x")
            os.read(done_r, 1)
        os._exit(0)
    try:
        assert os.read(locked_r, 1) == b"x"
        holders = apt.lock_holders(tmp_path, locks=(Path("/var/lib/apt/lists/lock"),))
        assert [h.pid for h in holders] == [pid]
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
    assert apt.lock_holders(tmp_path, locks=(Path("/var/lib/apt/lists/lock"),)) == []


def test_waits_until_the_locks_are_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(apt.time, "sleep", slept.append)
    looks = [[apt.LockHolder(Path("/var/lib/apt/lists/lock"), 72, "apt-get update")]] * 3
    ctx = make_ctx(tmp_path, config(), FakeRunner())
    waited = apt.wait_for_locks(
        ctx, "apt-get update", float("inf"), lambda: looks.pop() if looks else []
    )
    assert slept == [apt.LOCK_POLL_SECONDS] * 3 and waited >= 0


def test_gives_up_at_the_deadline_naming_lock_and_holder(tmp_path: Path) -> None:
    holder = apt.LockHolder(Path("/var/lib/apt/lists/lock"), 72, "/usr/bin/unattended-upgrade")
    ctx = make_ctx(tmp_path, config(lock_timeout=0), FakeRunner())
    with pytest.raises(StepFailed) as caught:
        apt.wait_for_locks(ctx, "apt-get update", 0.0, lambda: [holder])
    message = str(caught.value)
    assert "apt-get update: /var/lib/apt/lists/lock is held by process 72" in message
    assert "unattended-upgrade" in message and "apt.lock_timeout = 0 s" in message


def test_a_lock_taken_between_the_look_and_apt_is_waited_for_again(tmp_path: Path) -> None:
    busy = "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 90 (apt-get)"
    runner = FakeRunner().on(("apt-get",), rc=100, stderr=busy, times=1)
    ctx = make_ctx(tmp_path, config(), runner)
    apt.apt_get(ctx, "update", timeout=60, progress="apt-get update")
    assert [c.argv[-1] for c in runner.calls] == ["update", "update"]


def test_a_lock_held_past_the_timeout_fails_naming_it(tmp_path: Path) -> None:
    busy = "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 90 (apt-get)"
    runner = FakeRunner().on(("apt-get",), rc=100, stderr=busy)
    ctx = make_ctx(tmp_path, config(lock_timeout=0), runner)
    with pytest.raises(StepFailed) as caught:
        apt.apt_get(ctx, "update", timeout=60, progress="apt-get update")
    assert "/var/lib/apt/lists/lock is held by process 90 (apt-get)" in str(caught.value)


def test_needrestart_is_suspended_for_every_apt_run(tmp_path: Path) -> None:
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, config(), runner)
    apt.install(ctx, ["cron"])
    call = runner.calls[-1]
    assert call.env is not None and call.env["NEEDRESTART_SUSPEND"] == "1"
    assert call.env["DEBIAN_FRONTEND"] == "noninteractive"


def test_ubuntu_without_universe_gets_a_hint(tmp_path: Path) -> None:
    output = "E: Unable to locate package caddy\nE: Unable to locate package supervisor\n"
    hint = apt.universe_hint("ubuntu", output)
    assert hint is not None and "caddy, supervisor" in hint and "universe" in hint
    assert apt.universe_hint("debian", output) is None
    assert apt.universe_hint("ubuntu", "E: Unable to locate package nonesuch\n") is None

    runner = FakeRunner().on(lambda c: "install" in c.argv, rc=100, stderr=output)
    ctx = make_ctx(tmp_path, config(), runner, os_release=UBUNTU_2404)
    with pytest.raises(StepFailed, match="universe"):
        apt.install(ctx, ["caddy", "supervisor"])
