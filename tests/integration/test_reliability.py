"""Reliability and security proof, with figures: crashes anywhere, bad input, secrets, locks,
reboots, load and brute force, on real hosts (systemd-nspawn, Debian 12, real systemd).

Two hosts for the whole module, the first converging in the background while the tests drive
the second:

- the reference host converges without interruption (with two more applies racing the first),
  then goes through a failed run, a crashing run and a password rotation; it is what the crash
  host must end up like, and then serves the secrets, reboot, load and brute-force tests.
- the crash host starts fresh: invalid configs must leave it untouched, a held dpkg lock must
  fail the run cleanly, then the agent is SIGKILLed at every point of a first apply and of a
  rotation (DEVPI_AGENT_CRASH_AT, see agent/crashpoint.py), one point per run, each re-run
  getting further. A plain run must then converge to the reference host's fingerprint.

Figures go to test-artifacts/reliability.json (tools/reliability_table.py renders
docs/reliability.md from it). Load and brute-force figures are reported, not asserted.
"""

from __future__ import annotations

import base64
import http.client
import json
import secrets
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest
from agenthost import (
    AGENT,
    CADDY_CA,
    CONFIG,
    DIST,
    REPO,
    USER_PASSWORD,
    ApplyRun,
    ArgvWatcher,
    Ports,
    config_text,
)
from clients import Site, build_wheel, http_get, make_ca_bundle, pip_install, twine_upload
from nspawn import NspawnHost, free_port
from reliability_tools import (
    HOLD_DPKG_LOCK,
    canary_forms,
    diff_fingerprints,
    fingerprint,
    percentiles,
    record,
    run_agent,
    scan_for,
)

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from agent.steps import STEPS  # the working tree, which dist/ is built from

T = TypeVar("T")
ROTATED_PASSWORD = "canary-Rot-4d8e2b6a9c"
WRONG_ROOT_PASSWORD = "canary-WrongRoot-5e1f0a"
ROOT_PASS = "/etc/devpi-agent/root.pass"
AGENT_LOG = "/var/log/devpi-agent/agent.core.log"
CRASH_AT = "DEVPI_AGENT_CRASH_AT"
KILLED = -9  # nsenter passes on the agent's SIGKILL

# Points inside steps, in the order a first apply reaches them; the engine adds <step>:before and
# <step>:after around every step. "point@N": killed N seconds after the point, the run going on.
INSIDE_FIRST_APPLY: dict[str, list[str]] = {
    "apt": [
        "run:apt-get update~deb.debian.org",
        "run:apt-get install~Unpacking",
        "run:apt-get install~Setting up",
    ],
    "venv": [
        "venv:created",
        # uv prints a line when it has resolved the lock, then downloads every wheel (checking
        # its hash) before it installs any; killed 1 s after, some are downloaded, none in.
        "run:uv pip install~Resolved",
        "run:uv pip install~Resolved@1",
        # Every wheel copied into the venv, its bytecode not yet compiled.
        "run:uv pip install~Installed",
        # The sdist-only package built against the locked setuptools, the wheels all in.
        "run:uv pip install (sdists)~Resolved",
    ],
    "devpi-config": ["devpi-config:written"],
    "devpi-init": ["devpi-init:password-written", "run:devpi-init~"],
    "supervisor": ["supervisor:devpi-server-written", "supervisor:before-ready"],
    "devpi-users": ["devpi-users:changed"],
    "caddy": ["caddy:written"],
}
# A rotation with a new devpi port: every config written, every service told.
INSIDE_ROTATION = [
    "devpi-config:written",
    "supervisor:before-ready",
    "devpi-users:changed",
    "caddy:written",
]


def config_for(ports: Ports, password: str = USER_PASSWORD) -> str:
    return config_text(ports, password)


def port_names(ports: Ports) -> dict[str, int]:
    return {"https": ports.https, "admin": ports.admin, "devpi": ports.devpi}


def site_for(host: NspawnHost, ports: Ports, password: str, workdir: Path) -> Site:
    bundle = make_ca_bundle(host.path(CADDY_CA), workdir / f"ca-{host.machine}.pem")
    return Site("127.0.0.1", ports.https, "devops/pypi", "devops", password, bundle)


def new_host(rootfs: Path, ports: Ports) -> NspawnHost:
    host = NspawnHost(rootfs)
    host.prepare()
    host.copy_in(DIST, AGENT, mode=0o755)
    host.write(CONFIG, config_for(ports), mode=0o600)
    host.start(systemd=True)
    return host


def tail(run: ApplyRun) -> str:
    return f"rc={run.returncode}\nstdout: {run.stdout[-1500:]}\nstderr: {run.stderr[-3000:]}"


# --- the reference host -----------------------------------------------------------------------


@dataclass
class Reference:
    host: NspawnHost
    ports: Ports  # after the rotation (new devpi port)
    runs: dict[str, ApplyRun]
    argv_seen: set[str]
    root_password: str
    prints: dict[str, Any]
    site: Site
    workdir: Path
    lock_seconds: float
    seconds: float


def _lock_holder(host: NspawnHost, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = host.run(["cat", "/run/lock/devpi-agent.lock"], check=False).stdout.strip()
        if held.isdigit():
            return held.decode()
        time.sleep(0.1)
    raise AssertionError("the first apply never took the run lock")


def _converge_reference(host: NspawnHost, first: Ports, workdir: Path) -> Reference:
    """A full apply with two more racing it, a failed and a crashing run, then a rotation."""
    started = time.monotonic()
    runs: dict[str, ApplyRun] = {}
    with ArgvWatcher() as watcher:
        with ThreadPoolExecutor(3) as pool:
            converging = pool.submit(run_agent, host)
            _lock_holder(host)
            locked_at = time.monotonic()
            impatient = pool.submit(run_agent, host, "--lock-timeout", "2")
            patient = pool.submit(run_agent, host)
            runs["apply"] = converging.result()
            runs["apply --lock-timeout 2, while the first runs"] = impatient.result()
            runs["apply, while the first runs"] = patient.result()
        lock_seconds = time.monotonic() - locked_at
        root_password = host.path(ROOT_PASS).read_text().strip()
        rotated = Ports(first.https, free_port(), first.admin)
        host.write(CONFIG, config_for(rotated, ROTATED_PASSWORD), mode=0o600)
        # A failed run mid-rotation: devpi refuses the root password the agent has.
        host.write(ROOT_PASS, WRONG_ROOT_PASSWORD + "\n", mode=0o600)
        runs["rotation, wrong root password"] = run_agent(host)
        host.write(ROOT_PASS, root_password + "\n", mode=0o600)
        # A step that crashes with a traceback, right after devpi took the new password.
        crash = {CRASH_AT: "devpi-users:changed", "DEVPI_AGENT_CRASH_MODE": "raise"}
        runs["rotation, a step crashes"] = run_agent(host, env=crash)
        runs["rotation"] = run_agent(host)
    prints = fingerprint(
        host, port_names(rotated), {"devops": ROTATED_PASSWORD, "root": root_password}
    )
    site = site_for(host, rotated, ROTATED_PASSWORD, workdir)
    return Reference(
        host,
        rotated,
        runs,
        watcher.seen,
        root_password,
        prints,
        site,
        workdir,
        lock_seconds,
        time.monotonic() - started,
    )


class InBackground(Generic[T]):
    """Work on one host while the tests drive another (each host mostly waits on the network
    and its own services, so the two overlap well even on two cores)."""

    def __init__(self, work: Callable[[], T]) -> None:
        self._work = work
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._work()
        except BaseException as error:
            self._error = error

    def join(self) -> None:
        self._thread.join()

    def result(self) -> T:
        self.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


@pytest.fixture(scope="module")
def reference_in_background(
    rootfs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InBackground[Reference]]:
    """The reference host, converging in the background from the start of the module."""
    assert DIST.exists(), f"{DIST} is missing: run `make dist` first"
    first = Ports.free()
    workdir = tmp_path_factory.mktemp("reference")
    host = new_host(rootfs, first)
    pending: InBackground[Reference] | None = None
    try:
        pending = InBackground(lambda: _converge_reference(host, first, workdir))
        yield pending
    finally:
        if pending is not None:
            pending.join()
            if pending._error is not None:
                print(host.debug_report())
        host.stop()


@pytest.fixture
def reference(reference_in_background: InBackground[Reference]) -> Reference:
    return reference_in_background.result()


# --- the crash host ---------------------------------------------------------------------------


@dataclass
class CrashHost:
    host: NspawnHost
    ports: Ports
    workdir: Path
    applied: bool = False


@pytest.fixture(scope="module")
def crash_host(
    rootfs: Path,
    tmp_path_factory: pytest.TempPathFactory,
    reference_in_background: InBackground[Reference],
) -> Iterator[CrashHost]:
    """A fresh host, booted once the reference host is on its way."""
    ports = Ports.free()
    host = new_host(rootfs, ports)
    try:
        yield CrashHost(host, ports, tmp_path_factory.mktemp("crash"))
    except BaseException:
        print(host.debug_report())
        raise
    finally:
        host.stop()


def _bad_config(ports: Ports, what: str) -> tuple[bytes, str]:
    text = config_for(ports)
    if what == "unknown key":
        return text.replace("[devpi]", "[devpi]\nprot = 1").encode(), "devpi.prot"
    if what == "wrong type":
        return text.replace(
            f"https_port = {ports.https}", f'https_port = "{ports.https}"'
        ).encode(), ("server.https_port")
    if what == "duplicate user":
        extra = '[[users]]\nname = "devops"\npassword = "another-password"\n\n[[indexes]]'
        return text.replace("[[indexes]]", extra).encode(), "users[1].name"
    if what == "cyclic bases":
        return text.replace('bases = ["root/pypi"]', 'bases = ["devops/pypi"]').encode(), (
            "indexes[0].bases"
        )
    if what == "password over 72 bytes":
        return text.replace(USER_PASSWORD, "x" * 73).encode(), "users[0].password"
    if what == "unreadable password file":
        return text.replace(f'password = "{USER_PASSWORD}"', 'password_file = "/root"').encode(), (
            "users[0].password_file"
        )
    if what == "not UTF-8":
        return text.replace(USER_PASSWORD, "caf\xe9-password").encode("latin-1"), "/root/bad-"
    raise AssertionError(what)


# Every file under /etc, /var and /opt with its mtime, every package and every unit's state.
# Not compared: the journal, and the agent's own code cache (pex touches .last-access there).
_SNAPSHOT = (
    "find /etc /var /opt -xdev -not -path '/var/log/journal/*' "
    "-not -path '/var/cache/devpi-agent/*' "
    "-printf '%p %y %m %u:%g %s %T@\\n' 2>/dev/null | sort; "
    "dpkg-query -W -f='${Package} ${db:Status-Abbrev}\\n'; "
    "systemctl list-units --all --no-legend --plain | sort"
)


def test_invalid_configs_leave_a_fresh_host_untouched(crash_host: CrashHost) -> None:
    host = crash_host.host
    assert not crash_host.applied, "this test needs the crash host before any apply"
    # the agent's first start unpacks its code into /var/cache/devpi-agent: do that first
    assert host.output([AGENT, "version"]).startswith("devpi-agent ")
    before = host.output(["sh", "-c", _SNAPSHOT])
    whats = [
        "unknown key",
        "wrong type",
        "duplicate user",
        "cyclic bases",
        "password over 72 bytes",
        "unreadable password file",
        "not UTF-8",
    ]
    for n, what in enumerate(whats):
        data, key = _bad_config(crash_host.ports, what)
        path = f"/root/bad-{n}.toml"
        host.write(path, data, mode=0o600)
        run = run_agent(host, config=path)
        assert run.returncode == 2, (what, tail(run))
        assert run.stdout == ""
        assert f"invalid config: {key}" in run.stderr, (what, run.stderr)
    after = host.output(["sh", "-c", _SNAPSHOT])
    changed = sorted(set(before.splitlines()) ^ set(after.splitlines()))
    assert changed == [], "\n".join(changed)
    assert "caddy" not in host.output(["dpkg-query", "-W", "-f=${Package}\n"])
    record("bad_input_host", {"configs": len(whats), "exit_2": len(whats), "host_changes": 0})


@pytest.fixture
def fresh_host(rootfs: Path) -> Iterator[tuple[NspawnHost, Ports]]:
    """A fresh host of its own (not the crash walk's: on a first build the early steps, the
    venv and devpi-init, go on beside apt, so any apply there changes where the walk starts)."""
    ports = Ports.free()
    host = new_host(rootfs, ports)
    try:
        yield host, ports
    except BaseException:
        print(host.debug_report())
        raise
    finally:
        host.stop()


def test_dpkg_lock_held_fails_cleanly(fresh_host: tuple[NspawnHost, Ports]) -> None:
    host, ports = fresh_host
    host.write("/root/hold-dpkg-lock.py", HOLD_DPKG_LOCK)
    host.run(["sh", "-c", "python3 /root/hold-dpkg-lock.py 300 >/dev/null 2>&1 &"])
    deadline = time.monotonic() + 30
    holder = ""
    while not holder and time.monotonic() < deadline:
        holder = host.run(["cat", "/run/dpkg-lock-holder.pid"], check=False).stdout.decode()
        time.sleep(0.1)
    assert holder.isdigit(), "the lock holder did not start"
    timeout = 5
    locked = config_for(ports) + f"\n[apt]\nlock_timeout = {timeout}\n"
    host.write("/root/locked.toml", locked, mode=0o600)
    try:
        run = run_agent(host, config="/root/locked.toml")
    finally:
        # minbase has no /usr/bin/kill: the shell's, then wait until the lock is free
        host.run(
            ["sh", "-c", f"kill {holder}; while kill -0 {holder} 2>/dev/null; do sleep 0.1; done"]
        )
    assert run.returncode == 1, tail(run)
    # The holder's whole command line, as the kernel's lock table and /proc name it.
    message = (
        f"/var/lib/dpkg/lock-frontend is held by process {holder} "
        "(python3 /root/hold-dpkg-lock.py 300)"
    )
    assert message in run.stderr, run.stderr
    assert f"apt.lock_timeout = {timeout} s" in run.stderr
    apt_seconds = next(s["seconds"] for s in run.report["steps"] if s["name"] == "apt")
    assert apt_seconds >= timeout
    assert not host.path("/usr/sbin/policy-rc.d").exists()
    assert host.output(["dpkg", "--audit"]) == ""
    # What ran beside apt finished and is reported; nothing after apt ran.
    reported = {s["name"]: s for s in run.report["steps"]}
    assert reported["apt"]["status"] == "failed"
    assert all(s.get("early") for name, s in reported.items() if name != "apt"), reported
    assert "supervisor" not in reported
    record(
        "dpkg_lock",
        {"lock_timeout": timeout, "apt_step_seconds": apt_seconds, "exit": run.returncode},
    )


# The agent's useradd, as the service-user step runs it.
AGENTS_USERADD = (
    "useradd --system --user-group --home-dir /var/lib/devpi --no-create-home "
    "--shell /usr/sbin/nologin --comment 'devpi-server (managed by devpi-agent)' devpi"
)
ACCOUNT_FILES = ("/etc/passwd", "/etc/shadow", "/etc/group", "/etc/gshadow")


def _account_lines(host: NspawnHost) -> list[str]:
    return [host.output(["grep", "-h", "^devpi:", path]).strip() for path in ACCOUNT_FILES]


# What shadow's useradd leaves when it is killed between its writes (its close_files: passwd,
# shadow, group, gshadow): the crash walk's kills at apt:before caught the early steps' useradd
# after /etc/passwd (bookworm: the next run crashed on the missing group) and after /etc/group
# (trixie: grpconv's repair left /etc/gshadow unlike an uninterrupted host's).
@pytest.mark.parametrize(
    "cut_after",
    ["/etc/shadow", "/etc/group"],
    ids=["killed-before-group", "killed-before-gshadow"],
)
def test_a_useradd_cut_short_is_made_again(
    fresh_host: tuple[NspawnHost, Ports], cut_after: str
) -> None:
    host, ports = fresh_host
    host.run(["sh", "-c", AGENTS_USERADD])
    uninterrupted = _account_lines(host)
    unwritten = ACCOUNT_FILES[ACCOUNT_FILES.index(cut_after) + 1 :]
    host.run(["sed", "-i", "/^devpi:/d", *unwritten])
    host.write(CONFIG, config_for(ports), mode=0o600)
    run = run_agent(host)
    assert run.returncode == 0, tail(run)
    assert "make system user devpi again: a useradd was cut short" in run.stderr
    # As an uninterrupted useradd left them: the same uid, gid and shadow entries.
    assert _account_lines(host) == uninterrupted
    for check in (["pwck", "-r", "-q"], ["grpck", "-r"]):
        result = host.run(check, check=False)
        assert result.returncode == 0, (check, result.stdout, result.stderr)
    again = run_agent(host)
    assert again.returncode == 0 and again.report["changed"] == 0, tail(again)


_AFTER_KILL = r"""
import glob, json, os, subprocess, time
me = os.getpid()

def left_running():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")
            state = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0]
            wchan = open(f"/proc/{pid}/wchan").read()
            status = dict(
                line.split(":", 1) for line in open(f"/proc/{pid}/status") if ":" in line
            )
        except OSError:
            continue
        if int(pid) == me or not argv[0]:
            continue
        names = {os.path.basename(argv[0])}
        if names & {"python", "python3"} or os.path.basename(argv[0]).startswith("python3."):
            rest = argv[1:]
            if "-m" in rest:
                names.add(rest[rest.index("-m") + 1])
            names.update(os.path.basename(a) for a in rest[:3] if a and not a.startswith("-"))
        if names & PROGRAMS or (names == {"caddy"} and argv[1:2] in (["validate"], ["reload"])):
            killed = any(int(status[f], 16) >> (9 - 1) & 1 for f in ("SigPnd", "ShdPnd"))
            found.append((killed, f"{pid} [{state} {wchan}] " + " ".join(argv)[:120]))
    return found

# SIGKILL reaches a process in uninterruptible sleep (an fsync, say) only when that call
# returns: one the hook killed (SIGKILL pending) gets 10 s to go. One it missed is an orphan
# at once, however soon it would end by itself.
deadline = time.monotonic() + 10
running = left_running()
while any(killed for killed, _ in running) and time.monotonic() < deadline:
    time.sleep(0.1)
    running = left_running()
orphans = [what for _, what in running]
audit = subprocess.run(["dpkg", "--audit"], capture_output=True, text=True).stdout
print(json.dumps({
    "pending": sorted(os.listdir("/var/lib/devpi-agent/pending"))
    if os.path.isdir("/var/lib/devpi-agent/pending") else [],
    "dpkg_audit_lines": sum(1 for line in audit.splitlines() if line.startswith(" ")),
    "venv_dists": len(glob.glob("/opt/devpi-agent/venv/lib/python3*/site-packages/*.dist-info")),
    "orphans": orphans,
}))
"""
# Whatever the agent runs (the agent itself is "pex"); none of it may outlive a killed agent.
AGENT_PROGRAMS = {
    "pex",
    "apt-get",
    "apt",
    "dpkg",
    "dpkg-query",
    "uv",
    "pip",
    "venv",
    "devpi-init",
    "devpi-gen-secret",
    "runuser",
    "supervisorctl",
    "systemctl",
    "useradd",
    "userdel",
}


def _after_kill(host: NspawnHost) -> dict[str, Any]:
    """What a kill left behind: pending work, dpkg's state, the venv, and no orphan."""
    script = _AFTER_KILL.replace("PROGRAMS", repr(AGENT_PROGRAMS))
    state: dict[str, Any] = json.loads(host.output(["python3", "-c", script]))
    return state


# The points inside a step that runs beside apt on a first build (core/engine.py's early steps),
# reached only while that step has work left. A kill in apt can come after such a step has
# finished beside it (the venv takes 5-8 s, apt up to its first Unpacking as long): its points
# were then passed in that run, and the walk skips them rather than wait for a change that
# will not come. `plan` says whether the step still has work.
EARLY_STEP_POINTS = {
    point: step
    for step in ("venv", "devpi-config", "devpi-init")
    for point in INSIDE_FIRST_APPLY[step]
}


def _steps_with_work(host: NspawnHost) -> set[str]:
    plan = host.run(["env", "-u", "HOME", AGENT, "plan", "--config", CONFIG, "--json"], check=False)
    report = json.loads(plan.stdout)
    return {step["name"] for step in report["steps"] if step["status"] == "changed"}


def _crash_at_every_point(
    host: NspawnHost, points: list[str], skipped: list[str] | None = None
) -> list[dict[str, Any]]:
    survived = []
    for entry in points:
        step = EARLY_STEP_POINTS.get(entry)
        if skipped is not None and step is not None and step not in _steps_with_work(host):
            print(f"{entry}: passed beside apt in an earlier run ({step} has no work left)")
            skipped.append(entry)
            continue
        point, _, delay = entry.partition("@")
        run = run_agent(host, env={CRASH_AT: point, "DEVPI_AGENT_CRASH_DELAY": delay or "0"})
        assert run.returncode == KILLED, f"crash point {entry} was not reached: {tail(run)}"
        state = _after_kill(host)
        assert state["orphans"] == [], f"{entry}: processes outlived the agent: {state}"
        name = f"{point} +{delay} s" if delay else point
        survived.append({"point": name, "seconds": round(run.seconds, 1), **state})
        print(f"killed at {name} after {run.seconds:.1f} s: {state}")
    return survived


# On both releases: Debian 13's Python 3.13 venv has no setuptools, its systemd is 257.
@pytest.mark.suites("bookworm", "trixie")
def test_crash_anywhere_then_a_rerun_converges(
    crash_host: CrashHost, reference_in_background: InBackground[Reference], suite: str
) -> None:
    host, work = crash_host.host, crash_host.workdir
    crash_host.applied = True
    started = time.monotonic()
    # Package lists older than a day: this first apply refreshes them, as on a new server.
    host.run(["sh", "-c", "find /var/lib/apt/lists -type f -exec touch -d '3 days ago' {} +"])
    first_points = ["apt:before"]
    for step in (s.name for s in STEPS):
        first_points += [*INSIDE_FIRST_APPLY.get(step, []), f"{step}:after"]
    passed_early: list[str] = []
    first = _crash_at_every_point(host, first_points, passed_early)
    # A step's points are skipped all together or not at all: one with work left after a kill
    # inside it (a venv cut short) must never look finished.
    for step in {EARLY_STEP_POINTS[point] for point in passed_early}:
        its = [point for point, owner in EARLY_STEP_POINTS.items() if owner == step]
        assert [p for p in its if p in passed_early] == its, passed_early
    converged = run_agent(host)
    assert converged.returncode == 0, tail(converged)
    again = run_agent(host)
    assert again.returncode == 0 and again.report["changed"] == 0, tail(again)

    site = site_for(host, crash_host.ports, USER_PASSWORD, work)
    home = work / "home"
    home.mkdir()
    upload = twine_upload(site, build_wheel(work, "crash-canary", "1.0.0"), home)
    assert upload.returncode == 0, upload.stdout + upload.stderr

    # The same rotation as on the reference host (new password, new devpi port), killed at
    # every config written and every service told.
    rotated = Ports(crash_host.ports.https, free_port(), crash_host.ports.admin)
    host.write(CONFIG, config_for(rotated, ROTATED_PASSWORD), mode=0o600)
    second = _crash_at_every_point(host, INSIDE_ROTATION)
    converged = run_agent(host)
    assert converged.returncode == 0, tail(converged)
    again = run_agent(host)
    assert again.returncode == 0 and again.report["changed"] == 0, tail(again)

    root_password = host.path(ROOT_PASS).read_text().strip()
    reference = reference_in_background.result()
    prints = fingerprint(
        host, port_names(rotated), {"devops": ROTATED_PASSWORD, "root": root_password}
    )
    differences = diff_fingerprints(reference.prints, prints)

    rotated_site = Site(
        site.host, site.port, site.index, site.user, ROTATED_PASSWORD, site.ca_bundle
    )
    upload = twine_upload(rotated_site, build_wheel(work, "crash-canary", "2.0.0"), home)
    pip = pip_install(
        rotated_site, home, work / "target", "crash-canary==1.0.0", "six"
    )  # held before the crashes: still there
    old_password = http_get(site, "/+api", auth=("devops", USER_PASSWORD))[0]
    points = len(first) + len(second)
    record(
        "crash" if suite == "bookworm" else f"crash-{suite}",
        {
            "points": points,
            "survived": points,
            "first_apply_points": [p["point"] for p in first],
            "passed_beside_apt": passed_early,
            "rotation_points": [p["point"] for p in second],
            "fingerprint_differences": len(differences),
            "seconds": round(time.monotonic() - started, 1),
            "kills": first + second,
        },
    )
    assert differences == [], "\n".join(differences)
    assert upload.returncode == 0, upload.stdout + upload.stderr
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert old_password == 401
    assert points >= 15


# --- the reference host: concurrency, secrets, reboot, load ----------------------------------


def test_reference_runs(reference: Reference) -> None:
    runs = reference.runs
    assert runs["apply"].returncode == 0, tail(runs["apply"])
    failed = runs["rotation, wrong root password"]
    assert failed.returncode == 1, tail(failed)
    assert "devpi refuses the root password" in failed.stdout + failed.stderr
    crashed = runs["rotation, a step crashes"]
    assert crashed.returncode == 1, tail(crashed)
    assert "CrashPointReached" in crashed.stderr
    assert runs["rotation"].returncode == 0, tail(runs["rotation"])
    for name, run in runs.items():
        print(f"{name}: rc={run.returncode} {run.seconds:.1f} s")
    print(f"reference host ready in {reference.seconds:.0f} s")


def test_two_applies_at_once(reference: Reference) -> None:
    impatient = reference.runs["apply --lock-timeout 2, while the first runs"]
    assert impatient.returncode == 3, tail(impatient)
    assert impatient.stdout == ""
    assert "another devpi-agent run (pid " in impatient.stderr
    assert "holds /run/lock/devpi-agent.lock; gave up after waiting 2 s" in impatient.stderr
    patient = reference.runs["apply, while the first runs"]
    assert patient.returncode == 0, tail(patient)
    assert patient.report["changed"] == 0, patient.report
    # it waited for the first run to finish, then found nothing to do
    assert patient.seconds >= reference.lock_seconds - 5
    record(
        "concurrency",
        {
            "impatient_exit": impatient.returncode,
            "impatient_seconds": round(impatient.seconds, 1),
            "waiter_exit": patient.returncode,
            "waiter_seconds": round(patient.seconds, 1),
            "waiter_changed": patient.report["changed"],
        },
    )


def test_no_secret_leaks(reference: Reference) -> None:
    host = reference.host
    canaries = {
        "devops password before rotation": canary_forms("devops", USER_PASSWORD),
        "devops password after rotation": canary_forms("devops", ROTATED_PASSWORD),
        "devpi root password": canary_forms("root", reference.root_password),
        "wrong root password": canary_forms("root", WRONG_ROOT_PASSWORD),
    }
    agent_log = host.path(AGENT_LOG).read_text(errors="replace")
    assert "Traceback" in agent_log, "the crashing run should have logged a traceback"
    supervisor_logs = {
        p.name: p.read_text(errors="replace") for p in host.path("/var/log/supervisor").glob("*")
    }
    places = {
        "apply stdout and stderr": "\n".join(
            run.stdout + run.stderr for run in reference.runs.values()
        ),
        "agent log (tracebacks included)": agent_log,
        "supervisor logs": "\n".join(supervisor_logs.values()),
        "journal (caddy, supervisor, all units)": host.journal(lines=1_000_000),
        "process argv": "\n".join(reference.argv_seen),
    }
    assert "caddy" in places["journal (caddy, supervisor, all units)"]
    leaks = [
        f"{what} in {where}"
        for where, text in places.items()
        for what, forms in canaries.items()
        if any(form in text for form in forms)
    ]
    # Files: every file the host changed (the overlay's upper dir), journal files included.
    changed_files = host.dir / "upper" if host.mode == "overlay" else host.root
    needles = [form for forms in canaries.values() for form in forms]
    hits, files, size = scan_for(changed_files, needles)
    allowed = {CONFIG: "600 root", ROOT_PASS: "600 root"}
    for path in hits:
        inside = "/" + str(path.relative_to(changed_files))
        if inside not in allowed:
            leaks.append(f"a password in file {inside}")
    modes = {
        path: host.output(["stat", "-c", "%a %U", path])
        for path in (CONFIG, ROOT_PASS, "/var/lib/devpi/secret")
    }
    assert modes == {
        CONFIG: "600 root",
        ROOT_PASS: "600 root",
        "/var/lib/devpi/secret": "600 devpi",
    }
    assert host.output(["stat", "-c", "%a %U", "/etc/devpi-agent"]) == "700 root"
    record(
        "secrets",
        {
            "canaries": len(canaries),
            "runs": len(reference.runs),
            "places": [*sorted(places), "files written on the host"],
            "argv_samples": len(reference.argv_seen),
            "files_scanned": files,
            "mb_scanned": round(size / 1e6, 1),
            "leaks": len(leaks),
        },
    )
    assert leaks == []


def test_reboot_brings_every_service_back(reference: Reference) -> None:
    host, site, work = reference.host, reference.site, reference.workdir
    home = work / "reboot-home"
    home.mkdir()
    upload = twine_upload(site, build_wheel(work, "reboot-canary", "1.0.0"), home)
    assert upload.returncode == 0, upload.stdout + upload.stderr

    host.reboot()
    booted = time.monotonic()
    deadline = booted + 180
    status = 0
    while time.monotonic() < deadline:
        try:
            status = http_get(site, "/+api", auth=("devops", ROTATED_PASSWORD))[0]
        except OSError:
            status = 0
        if status == 200:
            break
        time.sleep(0.5)
    serving = time.monotonic() - booted
    assert status == 200, f"not serving {serving:.0f} s after the reboot"
    assert http_get(site, "/+api", auth=None)[0] == 401

    started = time.monotonic()
    pip = pip_install(site, home, work / "reboot-target", "reboot-canary==1.0.0", "six")
    install_seconds = time.monotonic() - started
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert (work / "reboot-target" / "six.py").exists()
    for unit in ("supervisor", "caddy"):
        assert host.output(["systemctl", "is-active", unit]) == "active"
    after = run_agent(host)
    assert after.returncode == 0 and after.report["changed"] == 0, tail(after)
    record(
        "reboot",
        {
            "boot_seconds": round(host.timings["boot"], 1),
            "serving_seconds_after_boot": round(serving, 1),
            "first_install_seconds": round(install_seconds, 1),
            "apply_after_reboot_changed": after.report["changed"],
        },
    )


def _timed(kind: str, call: Any, *args: Any) -> tuple[str, float, int, str]:
    started = time.monotonic()
    done = call(*args)
    return kind, time.monotonic() - started, done.returncode, (done.stdout + done.stderr)[-800:]


def test_load_twenty_installs_and_five_uploads(reference: Reference) -> None:
    site, work = reference.site, reference.workdir / "load"
    work.mkdir()
    home = work / "home"
    home.mkdir()
    seed = twine_upload(site, build_wheel(work, "load-canary", "1.0.0"), home)
    assert seed.returncode == 0, seed.stdout + seed.stderr
    jobs: list[tuple[str, Any, tuple[Any, ...]]] = []
    for n in range(5):
        (work / f"up-{n}").mkdir()
        wheel = build_wheel(work / f"up-{n}", f"load-upload-{n}", "1.0.0")
        jobs.append(("upload", twine_upload, (site, wheel, work / f"up-{n}")))
    for n in range(20):
        (work / f"pip-{n}").mkdir()
        args = (site, work / f"pip-{n}", work / f"pip-{n}" / "t", "load-canary==1.0.0", "six")
        jobs.append(("install", pip_install, args))
    started = time.monotonic()
    with ThreadPoolExecutor(len(jobs)) as pool:
        outcomes = list(pool.map(lambda job: _timed(job[0], job[1], *job[2]), jobs))
    wall = time.monotonic() - started
    errors = [(kind, rc, out) for kind, _, rc, out in outcomes if rc != 0]
    figures = {
        kind: percentiles([s for k, s, _, _ in outcomes if k == kind])
        for kind in ("install", "upload")
    }
    figures_all = {**figures, "wall_seconds": round(wall, 1), "errors": len(errors)}
    print(json.dumps(figures_all, indent=2))
    record("load", figures_all)
    assert errors == []


_CADDY_CPU = """
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        if open(f"/proc/{pid}/comm").read().strip() == "caddy":
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            print((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    except OSError:
        pass
"""


def _caddy_cpu(host: NspawnHost) -> float:
    return sum(float(x) for x in host.output(["python3", "-c", _CADDY_CPU]).split())


class Guesser:
    """A password guesser as a script would be: one kept-alive connection, a new guess each
    request (so the client spends next to nothing and Caddy a bcrypt check each)."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.context = ssl.create_default_context(cafile=str(site.ca_bundle))
        self.connection: http.client.HTTPSConnection | None = None

    def guess(self) -> int:
        token = base64.b64encode(f"devops:wrong-{secrets.token_hex(8)}".encode()).decode()
        try:
            if self.connection is None:
                self.connection = http.client.HTTPSConnection(
                    self.site.host, self.site.port, context=self.context, timeout=60
                )
            self.connection.request("GET", "/+api", headers={"Authorization": f"Basic {token}"})
            response = self.connection.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            self.close()
            return 0

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def test_brute_force_burst(reference: Reference) -> None:
    host, site = reference.host, reference.site
    auth = ("devops", ROTATED_PASSWORD)
    path = "/devops/pypi/+simple/six/"
    assert http_get(site, path, auth=auth)[0] == 200

    # How much CPU one wrong password costs Caddy (a bcrypt check, cost 12, every time:
    # Caddy caches results per password, so every guess is a new one).
    samples = 20
    guesser = Guesser(site)
    cpu0, wall0 = _caddy_cpu(host), time.monotonic()
    statuses = [guesser.guess() for _ in range(samples)]
    cpu_per_guess = (_caddy_cpu(host) - cpu0) / samples
    wall_per_guess = (time.monotonic() - wall0) / samples
    guesser.close()
    assert set(statuses) == {401}

    idle = []
    for _ in range(10):
        began = time.monotonic()
        assert http_get(site, path, auth=auth)[0] == 200
        idle.append(time.monotonic() - began)

    threads, seconds = 4, 10.0
    stop = threading.Event()
    counts = {"401": 0, "other": 0}
    lock = threading.Lock()

    def attacker() -> None:
        guesser = Guesser(site)
        while not stop.is_set():
            status = guesser.guess()
            with lock:
                counts["401" if status == 401 else "other"] += 1
        guesser.close()

    cpu1 = _caddy_cpu(host)
    burst_started = time.monotonic()
    pool = [threading.Thread(target=attacker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    during: list[float] = []
    failures: list[int] = []
    try:
        while time.monotonic() - burst_started < seconds:
            began = time.monotonic()
            try:
                status = http_get(site, path, auth=auth)[0]
            except OSError:
                status = 0
            during.append(time.monotonic() - began)
            if status != 200:
                failures.append(status)
            time.sleep(0.2)
        home = reference.workdir / "burst-home"
        home.mkdir()
        began = time.monotonic()
        pip = pip_install(site, home, home / "t", "six")
        pip_seconds = time.monotonic() - began
    finally:
        stop.set()
        for thread in pool:
            thread.join()
    burst = time.monotonic() - burst_started
    caddy_cores = (_caddy_cpu(host) - cpu1) / burst
    # What fail2ban could read: Caddy's own log lines about the refused logins.
    caddy_log = host.run(["journalctl", "-u", "caddy", "--no-pager", "-o", "cat"], check=False)
    refusals_logged = sum(
        1 for line in caddy_log.stdout.decode(errors="replace").splitlines() if "401" in line
    )
    figures = {
        "caddy_cpu_ms_per_wrong_password": round(cpu_per_guess * 1000, 1),
        "wrong_passwords_per_second_per_core": round(1 / cpu_per_guess, 1)
        if cpu_per_guess
        else None,
        "single_client_wrong_password_latency_ms": round(wall_per_guess * 1000, 1),
        "burst_threads": threads,
        "burst_seconds": round(burst, 1),
        "burst_wrong_requests_per_second": round((counts["401"] + counts["other"]) / burst, 1),
        "burst_refused": counts["401"],
        "burst_non_401": counts["other"],
        "burst_caddy_cores_busy": round(caddy_cores, 2),
        "caddy_log_lines_about_401": refusals_logged,
        "authenticated_idle": percentiles(idle),
        "authenticated_during_burst": percentiles(during),
        "authenticated_failures_during_burst": len(failures),
        "pip_install_during_burst_seconds": round(pip_seconds, 1),
        "pip_install_during_burst_exit": pip.returncode,
    }
    print(json.dumps(figures, indent=2))
    record("brute_force", figures)
    assert failures == []
    assert counts["other"] == 0
    assert pip.returncode == 0, pip.stdout + pip.stderr
