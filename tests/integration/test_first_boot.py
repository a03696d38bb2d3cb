"""A cloud image's first boot (issue #14): the apt lists are missing and apt-daily holds
/var/lib/apt/lists/lock while the agent starts. `apt-get update` takes that lock without waiting,
so before the fix the first apply failed at once; now apply waits for it (bounded by
apt.lock_timeout) and converges, and with a short timeout it fails naming the lock and holder.
On Debian 12 and 13.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agenthost import AGENT, CONFIG, DIST, Ports, apply, config_text
from nspawn import NspawnHost

SUITES = ("bookworm", "trixie")
LISTS_LOCK = "/var/lib/apt/lists/lock"
# How apt-daily holds it: an fcntl (lockf) lock on the lock file, for `seconds`.
HOLD_LISTS_LOCK = f"""
import fcntl, os, sys, time
handle = open("{LISTS_LOCK}", "w")
fcntl.lockf(handle, fcntl.LOCK_EX)
with open("/run/lists-lock-holder.pid", "w") as pid:
    pid.write(str(os.getpid()))
time.sleep(float(sys.argv[1]))
"""
HOLD_SECONDS = 20


@pytest.fixture
def first_boot_host(rootfs: Path) -> Iterator[NspawnHost]:
    assert DIST.exists(), f"{DIST} is missing: run `make dist` first"
    host = NspawnHost(rootfs)
    try:
        host.prepare()
        host.copy_in(DIST, AGENT, mode=0o755)
        host.start(systemd=True)
        # A cloud image's lists are absent until its first apt-get update.
        host.run(["sh", "-c", "rm -rf /var/lib/apt/lists/* && mkdir -p /var/lib/apt/lists"])
        host.write("/root/hold-lists-lock.py", HOLD_LISTS_LOCK)
        yield host
    except BaseException:
        print(host.debug_report())
        raise
    finally:
        host.stop()


def hold_lists_lock(host: NspawnHost, seconds: float) -> str:
    host.run(["sh", "-c", f"python3 /root/hold-lists-lock.py {seconds} >/dev/null 2>&1 &"])
    deadline = time.monotonic() + 30
    holder = ""
    while not holder.isdigit() and time.monotonic() < deadline:
        holder = host.run(["cat", "/run/lists-lock-holder.pid"], check=False).stdout.decode()
        time.sleep(0.1)
    assert holder.isdigit(), "the lock holder did not start"
    return holder


def test_apply_waits_for_the_lists_lock_then_converges(
    first_boot_host: NspawnHost, suite: str
) -> None:
    host = first_boot_host
    host.write(CONFIG, config_text(Ports.free()), mode=0o600)
    holder = hold_lists_lock(host, HOLD_SECONDS)
    run = apply(host)
    assert run.returncode == 0, run.stderr[-5000:]
    assert "waiting for apt's locks" in run.stderr
    assert f"{LISTS_LOCK} is held by process {holder}" in run.stderr
    waited = [line for line in run.stderr.splitlines() if '"apt locks free"' in line]
    assert waited, run.stderr[-3000:]
    print(f"{suite}: first apply {run.seconds:.1f} s, of which waiting for apt's lock: {waited[0]}")
    again = apply(host)
    assert again.returncode == 0 and again.report["changed"] == 0, again.stderr[-3000:]


def test_a_lock_held_past_the_timeout_fails_naming_it(
    first_boot_host: NspawnHost, suite: str
) -> None:
    host = first_boot_host
    host.write(CONFIG, config_text(Ports.free()) + "\n[apt]\nlock_timeout = 3\n", mode=0o600)
    holder = hold_lists_lock(host, 120)
    try:
        run = apply(host)
    finally:
        host.run(
            ["sh", "-c", f"kill {holder}; while kill -0 {holder} 2>/dev/null; do sleep 0.1; done"]
        )
    assert run.returncode == 1, run.stderr[-3000:]
    assert (
        f"apt-get update: {LISTS_LOCK} is held by process {holder} "
        "(python3 /root/hold-lists-lock.py 120)"
    ) in run.stderr
    assert "apt.lock_timeout = 3 s" in run.stderr
    apt_step = next(s for s in run.report["steps"] if s["name"] == "apt")
    assert apt_step["seconds"] >= 3
    # Nothing was installed and nothing is left held.
    assert not host.path("/usr/sbin/policy-rc.d").exists()
    assert host.run(["dpkg-query", "-W", "caddy"], check=False).returncode != 0
