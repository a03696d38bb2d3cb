"""Step logic against a FakeRunner and a temporary root: what runs, with which arguments, when."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import (
    ACTIVE_AND_ENABLED,
    REFERENCE_TOML,
    Call,
    FakeRunner,
    make_ctx,
    program,
    reference_data,
    result,
    uv_binary,
    uv_pip,
    uv_venv,
)

from agent.core import engine, log, paths
from agent.core.config import DEFAULT_CADDY_ADMIN, Config, parse
from agent.core.devpilock import shipped_lock
from agent.core.engine import LockTimeout, run_steps, single_run
from agent.core.files import render
from agent.core.runner import CommandFailed, Result
from agent.host import caddy as host_caddy
from agent.host import supervisor as host_supervisor
from agent.host import venv as host_venv
from agent.steps import STEPS, Context, Step, StepFailed, apt, caddy, devpi_init, service_user, venv

# --- helpers ----------------------------------------------------------------------------------


def config(**tables: dict[str, Any]) -> Config:
    data = reference_data()
    for name, values in tables.items():
        data.setdefault(name, {}).update(values)
    return parse(data)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_steps_are_in_order() -> None:
    assert [s.name for s in STEPS] == [
        "apt",
        "tls",
        "service-user",
        "devpi-upgrade",
        "venv",
        "devpi-config",
        "devpi-init",
        "supervisor",
        "devpi-users",
        "caddy",
        "backup",
        "metrics",
    ]
    assert all(s.description for s in STEPS)


def test_a_step_module_must_keep_the_contract() -> None:
    import types

    good = types.ModuleType("agent.steps.example", "Example: converges one thing.\n\nMore.")
    good.NAME = "example"  # type: ignore[attr-defined]
    good.converge = lambda ctx: None  # type: ignore[attr-defined]
    step = Step.of(good)
    assert (step.name, step.description) == ("example", "Example: converges one thing.")
    bare = types.ModuleType("agent.steps.bare")
    with pytest.raises(TypeError) as caught:
        Step.of(bare)
    assert "NAME (a non-empty str), converge(ctx), a docstring" in str(caught.value)


def test_fake_runner_raises_command_failed_on_check() -> None:
    runner = FakeRunner().on(["false"], rc=1, stderr="nope")
    with pytest.raises(CommandFailed, match="`false` exited 1"):
        runner.run(["false"])
    assert runner.run(["false"], check=False).returncode == 1
    assert runner.run(["true"]).ok
    assert [c.argv for c in runner.calls] == [("false",), ("false",), ("true",)]


# --- apt --------------------------------------------------------------------------------------


def dpkg_output(*missing: str) -> str:
    lines = []
    for name in apt.PACKAGES:
        if name in missing:
            lines.append(f"{name}\tun \t\n")
        else:
            lines.append(f"{name}\tii \t1.0-1\n")
    return "".join(lines)


def apt_runner(*missing: str) -> FakeRunner:
    """dpkg-query reports `missing` once, then everything installed (as after apt-get install)."""
    runner = FakeRunner()
    runner.on(["dpkg-query"], stdout=dpkg_output(*missing), times=1)
    runner.on(["dpkg-query"], stdout=dpkg_output())
    return runner


def fresh_lists(tmp_path: Path, age: float = 0) -> Path:
    lists = tmp_path / "var/lib/apt/lists"
    lists.mkdir(parents=True, exist_ok=True)
    packages = lists / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages"
    packages.write_text("Package: x\n")
    when = time.time() - age
    os.utime(packages, (when, when))
    return packages


def apt_get_calls(runner: FakeRunner) -> list[Call]:
    return runner.ran(["apt-get"])


def apt_verb(call: Call) -> str:
    """The apt-get sub-command, past the -o options."""
    args = list(call.argv[1:])
    while args and args[0] == "-o":
        args = args[2:]
    return " ".join(a for a in args if not a.startswith("-"))


def test_apt_all_installed_does_nothing(tmp_path: Path) -> None:
    runner = apt_runner()
    ctx = make_ctx(tmp_path, config(), runner)
    apt.converge(ctx)
    assert apt_get_calls(runner) == []
    assert ctx.changes == []
    [query] = runner.calls
    assert query.argv[:3] == (
        "dpkg-query",
        "-W",
        "-f=${Package}\t${db:Status-Abbrev}\t${Version}\n",
    )
    assert list(query.argv[3:]) == apt.PACKAGES
    assert query.check is False


def test_apt_missing_with_fresh_lists_installs_without_update(tmp_path: Path) -> None:
    fresh_lists(tmp_path)
    runner = apt_runner("caddy")
    ctx = make_ctx(tmp_path, config(), runner)
    apt.converge(ctx)
    calls = apt_get_calls(runner)
    assert [apt_verb(c) for c in calls] == ["install caddy"]
    [install] = calls
    assert install.argv == (
        "apt-get",
        "-o",
        "DPkg::Lock::Timeout=600",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
        "install",
        "-y",
        "--no-install-recommends",
        "caddy",
    )
    assert install.env is not None
    assert install.env["DEBIAN_FRONTEND"] == "noninteractive"
    assert install.env["NEEDRESTART_MODE"] == "a"
    assert install.check is True
    assert ctx.changes == ["install caddy"]
    # installed packages were checked again afterwards
    programs = [c.argv[0] for c in runner.calls]
    assert programs[:3] == ["dpkg-query", "apt-get", "dpkg-query"]
    assert set(programs[3:]) <= {"dpkg-query"}


def test_apt_checks_installed_packages_once_after_install(tmp_path: Path) -> None:
    fresh_lists(tmp_path)
    runner = apt_runner("caddy")
    apt.converge(make_ctx(tmp_path, config(), runner))
    assert [c.argv[0] for c in runner.calls] == ["dpkg-query", "apt-get", "dpkg-query"]


def test_apt_missing_without_lists_updates_first(tmp_path: Path) -> None:
    runner = apt_runner("caddy", "supervisor")
    ctx = make_ctx(tmp_path, config(), runner)
    apt.converge(ctx)
    calls = apt_get_calls(runner)
    assert [apt_verb(c) for c in calls] == ["update", "install supervisor caddy"]
    for call in calls:
        assert "-o" in call.argv
        assert call.argv[call.argv.index("-o") + 1] == "DPkg::Lock::Timeout=600"
        assert call.env is not None
        assert call.env["DEBIAN_FRONTEND"] == "noninteractive"
        assert call.env["NEEDRESTART_MODE"] == "a"
    assert ctx.changes == ["refresh apt package lists", "install supervisor caddy"]


def test_apt_stale_lists_are_refreshed(tmp_path: Path) -> None:
    fresh_lists(tmp_path, age=apt.LISTS_MAX_AGE + 60)
    runner = apt_runner("caddy")
    apt.converge(make_ctx(tmp_path, config(), runner))
    assert [apt_verb(c) for c in apt_get_calls(runner)] == ["update", "install caddy"]


def test_apt_lock_timeout_is_configurable(tmp_path: Path) -> None:
    fresh_lists(tmp_path)
    runner = apt_runner("caddy")
    apt.converge(make_ctx(tmp_path, config(apt={"lock_timeout": 42}), runner))
    [install] = apt_get_calls(runner)
    assert "DPkg::Lock::Timeout=42" in install.argv
    assert install.timeout > 42


def test_apt_check_mode_runs_no_apt_get(tmp_path: Path) -> None:
    runner = apt_runner("caddy")
    ctx = make_ctx(tmp_path, config(), runner, check=True)
    apt.converge(ctx)
    assert apt_get_calls(runner) == []
    assert ctx.changes == ["refresh apt package lists", "install caddy"]
    assert not (tmp_path / "usr/sbin/policy-rc.d").exists()


def test_apt_policy_rc_d_holds_services_during_install(tmp_path: Path) -> None:
    fresh_lists(tmp_path)
    policy = tmp_path / "usr/sbin/policy-rc.d"
    seen: list[tuple[bool, str, int]] = []

    def install(call: Call) -> Result:
        seen.append((policy.exists(), policy.read_text(), mode_of(policy)))
        return result(call.argv)

    runner = apt_runner("caddy")
    runner.on(["apt-get"], install)
    ctx = make_ctx(tmp_path, config(), runner)
    apt.converge(ctx)
    assert len(seen) == 1
    exists, content, mode = seen[0]
    assert exists
    assert content == render("policy-rc.d.j2")
    assert "exit 101" in content
    assert mode == 0o755
    assert not policy.exists()
    assert ctx.files.changes == []  # the agent's own scratch file is no change


def test_apt_policy_rc_d_removed_when_install_fails(tmp_path: Path) -> None:
    fresh_lists(tmp_path)
    runner = apt_runner("caddy").on(["apt-get"], rc=100, stderr="E: broken")
    with pytest.raises(CommandFailed, match="exited 100"):
        apt.converge(make_ctx(tmp_path, config(), runner))
    assert not (tmp_path / "usr/sbin/policy-rc.d").exists()


def test_apt_foreign_policy_rc_d_is_left_alone(tmp_path: Path) -> None:
    fresh_lists(tmp_path)
    policy = tmp_path / "usr/sbin/policy-rc.d"
    policy.parent.mkdir(parents=True)
    policy.write_text("#!/bin/sh\nexit 0\n")
    runner = apt_runner("caddy")
    apt.converge(make_ctx(tmp_path, config(), runner))
    assert policy.read_text() == "#!/bin/sh\nexit 0\n"


def test_apt_leftover_policy_rc_d_is_removed(tmp_path: Path) -> None:
    policy = tmp_path / "usr/sbin/policy-rc.d"
    policy.parent.mkdir(parents=True)
    policy.write_text(render("policy-rc.d.j2"))
    runner = apt_runner()
    ctx = make_ctx(tmp_path, config(), runner)
    apt.converge(ctx)
    assert not policy.exists()
    assert ctx.changes == []


def test_apt_still_missing_after_install_fails(tmp_path: Path) -> None:
    fresh_lists(tmp_path)
    runner = FakeRunner().on(["dpkg-query"], stdout=dpkg_output("caddy"))
    with pytest.raises(StepFailed, match="caddy is not installed"):
        apt.converge(make_ctx(tmp_path, config(), runner))


def test_apt_upgrade(tmp_path: Path) -> None:
    fresh_lists(tmp_path)
    simulation = (
        "Reading package lists...\n"
        "Inst libc6 [2.36-9+deb12u7] (2.36-9+deb12u8 Debian:12.8/stable [amd64])\n"
        "Inst openssl [3.0.14-1~deb12u1] (3.0.15-1~deb12u1 Debian-Security:12/stable-security)\n"
        "Conf libc6 (2.36-9+deb12u8 Debian:12.8/stable [amd64])\n"
    )
    runner = apt_runner()
    runner.on(lambda c: c.argv[0] == "apt-get" and "-s" in c.argv, stdout=simulation)
    ctx = make_ctx(tmp_path, config(apt={"upgrade": True}), runner)
    apt.converge(ctx)
    calls = apt_get_calls(runner)
    assert [apt_verb(c) for c in calls] == ["upgrade", "upgrade"]
    assert "-s" in calls[0].argv
    assert calls[1].argv[-2:] == ("upgrade", "-y")
    assert calls[1].env is not None
    assert calls[1].env["DEBIAN_FRONTEND"] == "noninteractive"
    assert ctx.changes == ["upgrade 2 packages"]


def test_apt_upgrade_with_stale_lists_updates_first(tmp_path: Path) -> None:
    runner = apt_runner()
    ctx = make_ctx(tmp_path, config(apt={"upgrade": True}), runner)
    apt.converge(ctx)
    # nothing pending in the (empty) simulation: update and simulate only
    calls = apt_get_calls(runner)
    assert [apt_verb(c) for c in calls] == ["update", "upgrade"]
    assert "-s" in calls[1].argv
    assert ctx.changes == ["refresh apt package lists"]


def test_apt_official_source_check_mode_touches_no_network(tmp_path: Path) -> None:
    runner = apt_runner()
    ctx = make_ctx(tmp_path, config(caddy={"source": "official"}), runner, check=True)
    apt.converge(ctx)
    assert ctx.changes[0].startswith("fetch Caddy's signing key into ")
    assert f"write {apt.CADDY_LIST}" in ctx.changes
    assert not (tmp_path / "etc").exists()


def test_apt_official_source_changed_forces_update(tmp_path: Path) -> None:
    fresh_lists(tmp_path)
    keyring = tmp_path / str(apt.CADDY_KEYRING).lstrip("/")
    keyring.parent.mkdir(parents=True)
    keyring.write_bytes(b"\x99key")
    runner = apt_runner("caddy")
    ctx = make_ctx(tmp_path, config(caddy={"source": "official"}), runner)
    apt.converge(ctx)
    listing = (tmp_path / str(apt.CADDY_LIST).lstrip("/")).read_text()
    assert f"signed-by={apt.CADDY_KEYRING}" in listing
    assert [apt_verb(c) for c in apt_get_calls(runner)] == ["update", "install caddy"]


# --- service user (pwd faked) -----------------------------------------------------------------


def fake_pwd(
    monkeypatch: pytest.MonkeyPatch,
    entries: dict[str, tuple[int, str]],
    groups: dict[str, int] | None = None,
) -> None:
    """Users (uid, home; their gid is their uid) and groups (gid): every user's own group
    exists unless `groups` says otherwise."""
    if groups is None:
        groups = {name: uid for name, (uid, _) in entries.items()}

    def getpwnam(name: str) -> SimpleNamespace:
        if name not in entries:
            raise KeyError(name)
        uid, home = entries[name]
        return SimpleNamespace(
            pw_name=name, pw_uid=uid, pw_gid=uid, pw_dir=home, pw_gecos=service_user.COMMENT
        )

    def getgrnam(name: str) -> SimpleNamespace:
        if name not in groups:
            raise KeyError(name)
        return SimpleNamespace(gr_gid=groups[name])

    monkeypatch.setattr(service_user, "pwd", SimpleNamespace(getpwnam=getpwnam))
    monkeypatch.setattr(service_user, "grp", SimpleNamespace(getgrnam=getgrnam))


def test_service_user_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_pwd(monkeypatch, {})
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, config(), runner)
    service_user.converge(ctx)
    [useradd] = runner.calls
    assert useradd.argv[0] == "useradd"
    assert useradd.argv[-1] == "devpi"
    assert "--system" in useradd.argv
    assert useradd.argv[useradd.argv.index("--home-dir") + 1] == "/var/lib/devpi"
    assert mode_of(tmp_path / "var/lib/devpi") == 0o750
    assert ctx.changes == ["create system user devpi", "make directory /var/lib/devpi"]


def test_service_user_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_pwd(monkeypatch, {"devpi": (998, "/var/lib/devpi")})
    (tmp_path / "var/lib/devpi").mkdir(parents=True, mode=0o750)
    (tmp_path / "var/lib/devpi").chmod(0o750)
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, config(), runner)
    service_user.converge(ctx)
    assert runner.calls == []
    assert ctx.changes == []


def test_service_user_joins_a_group_of_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_pwd(monkeypatch, {}, groups={"devpi": 997})
    runner = FakeRunner()
    service_user.converge(make_ctx(tmp_path, config(), runner))
    [useradd] = runner.calls
    assert useradd.argv[useradd.argv.index("--gid") + 1] == "devpi"
    assert "--user-group" not in useradd.argv


def _devpi_home(tmp_path: Path) -> None:
    (tmp_path / "var/lib/devpi").mkdir(parents=True, mode=0o750)
    (tmp_path / "var/lib/devpi").chmod(0o750)


@pytest.mark.parametrize(
    ("shadow", "gshadow", "missing"),
    [
        # Killed after /etc/passwd and /etc/shadow, before /etc/group.
        ("devpi:!:20425::::::\n", None, "group devpi"),
        # Killed after /etc/passwd, before /etc/shadow (and the group).
        ("", None, "group devpi, entry in /etc/shadow"),
        # Killed after /etc/group, before /etc/gshadow.
        ("devpi:!:20425::::::\n", "", "entry in /etc/gshadow"),
    ],
)
def test_service_user_cut_short_is_made_again(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    shadow: str,
    gshadow: str | None,
    missing: str,
) -> None:
    fake_pwd(
        monkeypatch,
        {"devpi": (998, "/var/lib/devpi")},
        groups={} if "group devpi" in missing else {"devpi": 998},
    )
    _devpi_home(tmp_path)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n" + shadow)
    (tmp_path / "etc/gshadow").write_text(
        "root:*::\n" + (gshadow if gshadow is not None else "devpi:!::\n")
    )
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, config(), runner)
    service_user.converge(ctx)
    userdel, useradd = runner.calls
    assert list(userdel.argv) == ["userdel", "devpi"]
    assert useradd.argv[0] == "useradd" and useradd.argv[-1] == "devpi"
    assert ctx.changes == [f"make system user devpi again: a useradd was cut short (no {missing})"]


def test_service_user_incomplete_but_not_ours_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_pwd(monkeypatch, {"devpi": (998, "/var/lib/devpi")}, groups={})
    entry = service_user.pwd.getpwnam("devpi")
    entry.pw_gecos = "someone's devpi"
    monkeypatch.setattr(service_user, "_user", lambda name: entry)
    runner = FakeRunner()
    with pytest.raises(StepFailed, match="exists without its group devpi, and devpi-agent did not"):
        service_user.converge(make_ctx(tmp_path, config(), runner))
    assert runner.calls == []


@pytest.mark.parametrize(
    ("entry", "message"),
    [((1000, "/var/lib/devpi"), "not a system user"), ((998, "/home/devpi"), "with home")],
)
def test_service_user_unsuitable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: tuple[int, str], message: str
) -> None:
    fake_pwd(monkeypatch, {"devpi": entry})
    with pytest.raises(StepFailed, match=message):
        service_user.converge(make_ctx(tmp_path, config(), FakeRunner()))


# --- venv -------------------------------------------------------------------------------------

VENV = Path("/opt/devpi-agent/venv")
PINS = ("devpi-server==6.20.3", "devpi-web==5.1.1", "devpi-client==7.3.0")


def site_packages(tmp_path: Path) -> Path:
    return tmp_path / "opt/devpi-agent/venv/lib/python3.11/site-packages"


def install_dists(tmp_path: Path, **versions: str) -> None:
    sp = site_packages(tmp_path)
    sp.mkdir(parents=True, exist_ok=True)
    for old in sp.glob("devpi_*.dist-info"):
        if old.name.split("-")[0].removeprefix("devpi_") in versions:
            old.rmdir()
    for name, version in versions.items():
        (sp / f"devpi_{name}-{version}.dist-info").mkdir()


def make_venv(
    tmp_path: Path, server: str = "6.20.3", web: str = "5.1.1", client: str = "7.3.0"
) -> None:
    python = tmp_path / "opt/devpi-agent/venv/bin/python"
    python.parent.mkdir(parents=True, exist_ok=True)
    python.write_text("")
    # Built from the shipped lock.
    (python.parent.parent / host_venv.VENV_LOCK).write_text(shipped_lock())
    install_dists(tmp_path, server=server, web=web, client=client)


def test_installed_versions(tmp_path: Path) -> None:
    one, two = tmp_path / "a", tmp_path / "b"
    for name in (
        "devpi_server-6.20.3.dist-info",
        "devpi_web-5.1.1.dist-info",
        "Devpi.Common-4.1.1.dist-info",
        "not-a-dist-info",
        "broken.dist-info",
    ):
        (one / name).mkdir(parents=True)
    for name in ("devpi_client-7.3.0.dist-info", "zope.interface-7.1.1.dist-info"):
        (two / name).mkdir(parents=True)
    assert host_venv.installed_versions([one, two]) == {
        "devpi-server": "6.20.3",
        "devpi-web": "5.1.1",
        "devpi-common": "4.1.1",
        "devpi-client": "7.3.0",
        "zope-interface": "7.1.1",
    }
    assert host_venv.installed_versions([tmp_path / "missing"]) == {}


LOCK_INSTALL = (
    "install 74 locked packages from the lock shipped in the agent "
    "(/opt/devpi-agent/venv/devpi-agent.lock)"
)


def test_venv_pins_match_no_pip(tmp_path: Path) -> None:
    make_venv(tmp_path)
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, config(), runner)
    venv.converge(ctx)
    assert runner.calls == []
    assert ctx.changes == []
    assert not ctx.is_pending("devpi-server-restart")


def pip_installs_pins(tmp_path: Path) -> FakeRunner:
    def pip(call: Call) -> Result:
        install_dists(tmp_path, server="6.20.3", web="5.1.1", client="7.3.0")
        return result(call.argv)

    return FakeRunner().on(uv_pip("install"), pip)


def test_venv_pin_differs_uv_installs_all_three(tmp_path: Path) -> None:
    make_venv(tmp_path, web="5.1.0")
    runner = pip_installs_pins(tmp_path)
    ctx = make_ctx(tmp_path, config(), runner)
    venv.converge(ctx)
    # Every wheel in one run, then the sdist-only pyramid-chameleon; nothing resolved.
    wheels, sdists = runner.calls
    for install in (wheels, sdists):
        assert install.argv[:5] == (
            uv_binary(),
            "pip",
            "install",
            "--python",
            str(VENV / "bin/python"),
        )
        assert {"--require-hashes", "--no-deps", "--compile-bytecode"} <= set(install.argv)
        assert install.env is not None
        # root's own cache (HOME is unset under cloud-init), no Python downloads.
        assert install.env["UV_CACHE_DIR"] == "/var/cache/devpi-agent/uv-cache"
        assert install.env["UV_PYTHON_DOWNLOADS"] == "never"
        # Never the operator's directory: its uv.toml or pyproject.toml is no setting for devpi.
        assert install.cwd == "/"
    assert wheels.argv[-2:] == ("-r", str(VENV / ".devpi-agent-install/wheels.txt"))
    assert "--only-binary" in wheels.argv and "--no-build-isolation" in sdists.argv
    assert ctx.changes == [LOCK_INSTALL]
    assert ctx.is_pending("devpi-server-restart")
    assert (tmp_path / "var/lib/devpi-agent/pending/devpi-server-restart").exists()


def test_venv_created_when_missing(tmp_path: Path) -> None:
    def make(call: Call) -> Result:
        make_venv(tmp_path, server="0", web="0", client="0")
        return result(call.argv)

    runner = pip_installs_pins(tmp_path)
    runner.on(uv_venv, make)
    ctx = make_ctx(tmp_path, config(), runner)
    venv.converge(ctx)
    assert [c.argv[1:3] for c in runner.calls] == [
        ("venv", "--quiet"),
        ("pip", "install"),
        ("pip", "install"),
    ]
    assert runner.calls[0].cwd == "/"
    assert runner.calls[0].argv == (
        uv_binary(),
        "venv",
        "--quiet",
        "--no-project",
        "--python",
        host_venv.SYSTEM_PYTHON,
        str(VENV),
    )
    assert ctx.changes[0] == f"create venv {VENV}"


def test_venv_pip_without_effect_fails(tmp_path: Path) -> None:
    make_venv(tmp_path, server="6.20.2")
    ctx = make_ctx(tmp_path, config(), FakeRunner())
    with pytest.raises(StepFailed, match=r"devpi-server==6\.20\.3 is not installed"):
        venv.converge(ctx)
    assert not ctx.is_pending("devpi-server-restart")


def test_venv_check_mode(tmp_path: Path) -> None:
    make_venv(tmp_path, client="7.2.0")
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, config(), runner, check=True)
    venv.converge(ctx)
    assert runner.calls == []
    assert ctx.changes == [LOCK_INSTALL]
    assert not (tmp_path / "var/lib/devpi-agent").exists()


# --- devpi-init -------------------------------------------------------------------------------


def under(tmp_path: Path, path: Path | str) -> Path:
    return tmp_path / str(path).lstrip("/")


def initialised(tmp_path: Path) -> None:
    root_pass = under(tmp_path, "/etc/devpi-agent/root.pass")
    root_pass.parent.mkdir(parents=True, mode=0o700)
    root_pass.write_text("existing-root-password\n")
    root_pass.chmod(0o600)
    under(tmp_path, "/var/lib/devpi/server").mkdir(parents=True)
    under(tmp_path, "/var/lib/devpi/server/.nodeinfo").write_text("{}")
    under(tmp_path, "/var/lib/devpi/secret").write_text("s" * 40)


def fake_devpi_init(tmp_path: Path) -> FakeRunner:
    def init(call: Call) -> Result:
        serverdir = call.argv[call.argv.index("--serverdir") + 1]
        staging = under(tmp_path, serverdir)
        staging.mkdir(parents=True)
        (staging / ".nodeinfo").write_text('{"uuid": "x"}')
        return result(call.argv)

    return FakeRunner().on(program("devpi-init"), init)


def test_devpi_init_done_runs_nothing(tmp_path: Path) -> None:
    initialised(tmp_path)
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, config(), runner)
    devpi_init.converge(ctx)
    assert runner.calls == []
    assert ctx.changes == []
    assert ctx.files.changes == []


def test_devpi_init_fresh(tmp_path: Path) -> None:
    runner = fake_devpi_init(tmp_path)
    ctx = make_ctx(tmp_path, config(), runner)
    devpi_init.converge(ctx)

    root_pass = under(tmp_path, "/etc/devpi-agent/root.pass")
    assert mode_of(root_pass) == 0o600
    assert mode_of(root_pass.parent) == 0o700
    password = root_pass.read_text().removesuffix("\n")
    assert len(password) >= 32

    gen, init = runner.calls
    assert gen.argv == (
        "/opt/devpi-agent/venv/bin/devpi-gen-secret",
        "--secretfile",
        "/var/lib/devpi/secret",
    )
    assert init.argv == (
        "/opt/devpi-agent/venv/bin/devpi-init",
        "--configfile",
        "/etc/devpi-server/devpi-server.yml",
        "--serverdir",
        "/var/lib/devpi/server.init",
        "--no-root-pypi",
    )
    for call in (gen, init):
        assert call.user == "devpi"
        assert call.cwd == "/var/lib/devpi"
    assert init.env == {"DEVPISERVER_ROOT_PASSWD": password}
    assert gen.env is None or password not in gen.env.values()
    for call in runner.calls:
        assert not any(password in arg for arg in call.argv)

    assert under(tmp_path, "/var/lib/devpi/server/.nodeinfo").exists()
    assert not under(tmp_path, "/var/lib/devpi/server.init").exists()
    assert ctx.is_pending("devpi-server-restart")
    assert any("secret content created" in c.diff for c in ctx.files.changes)
    assert all(password not in c.diff for c in ctx.files.changes)
    assert all(password not in change for change in ctx.changes)


def test_devpi_init_reuses_existing_root_password(tmp_path: Path) -> None:
    initialised(tmp_path)
    under(tmp_path, "/var/lib/devpi/server/.nodeinfo").unlink()
    under(tmp_path, "/var/lib/devpi/server").rmdir()
    runner = fake_devpi_init(tmp_path)
    devpi_init.converge(make_ctx(tmp_path, config(), runner))
    [init] = runner.calls
    assert init.env == {"DEVPISERVER_ROOT_PASSWD": "existing-root-password"}


def test_devpi_init_without_nodeinfo_fails(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, config(), FakeRunner())
    with pytest.raises(StepFailed, match=r"server\.init/\.nodeinfo is missing"):
        devpi_init.converge(ctx)
    assert not under(tmp_path, "/var/lib/devpi/server").exists()


def test_devpi_init_refuses_foreign_server_dir(tmp_path: Path) -> None:
    foreign = under(tmp_path, "/var/lib/devpi/server/data.sqlite")
    foreign.parent.mkdir(parents=True)
    foreign.write_text("precious")
    runner = fake_devpi_init(tmp_path)
    with pytest.raises(StepFailed, match=r"no \.nodeinfo"):
        devpi_init.converge(make_ctx(tmp_path, config(), runner))
    assert foreign.read_text() == "precious"
    assert runner.ran_program("devpi-init") == []


def test_devpi_init_clears_stale_staging(tmp_path: Path) -> None:
    stale = under(tmp_path, "/var/lib/devpi/server.init/half-made")
    stale.parent.mkdir(parents=True)
    stale.write_text("x")
    devpi_init.converge(make_ctx(tmp_path, config(), fake_devpi_init(tmp_path)))
    assert not under(tmp_path, "/var/lib/devpi/server/half-made").exists()
    assert under(tmp_path, "/var/lib/devpi/server/.nodeinfo").exists()


def test_devpi_init_check_mode(tmp_path: Path) -> None:
    runner = fake_devpi_init(tmp_path)
    ctx = make_ctx(tmp_path, config(), runner, check=True)
    devpi_init.converge(ctx)
    assert runner.calls == []
    assert not (tmp_path / "etc").exists()
    assert not (tmp_path / "var").exists()
    assert len(ctx.changes) == 4  # root.pass dir, root.pass, secret, server dir


def test_devpi_init_bad_root_password_file(tmp_path: Path) -> None:
    root_pass = under(tmp_path, "/etc/devpi-agent/root.pass")
    root_pass.parent.mkdir(parents=True)
    root_pass.write_bytes(b"\xff\xfe")
    with pytest.raises(StepFailed, match=r"devpi\.root_password_file"):
        devpi_init.converge(make_ctx(tmp_path, config(), FakeRunner()))


# --- caddy ------------------------------------------------------------------------------------


def test_basic_auth_directive() -> None:
    assert caddy.basic_auth_directive((2, 6, 2)) == "basicauth"
    assert caddy.basic_auth_directive((2, 7, 6)) == "basicauth"
    assert caddy.basic_auth_directive((2, 8, 0)) == "basic_auth"
    assert caddy.basic_auth_directive((2, 10, 0)) == "basic_auth"
    assert caddy.basic_auth_directive((3, 0, 0)) == "basic_auth"


@pytest.fixture
def fast_bcrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caddy, "BCRYPT_ROUNDS", 4)


@pytest.mark.usefixtures("fast_bcrypt")
def test_existing_hashes_parses_rendered_file(tmp_path: Path) -> None:
    data = reference_data()
    data["users"].append({"name": "ci.bot_1", "password": "another-password"})
    ctx = make_ctx(tmp_path, parse(data), FakeRunner())
    for version in ((2, 6, 2), (2, 10, 0)):
        rendered = caddy.content(ctx, version, None)
        hashes = caddy.existing_hashes(rendered)
        assert set(hashes) == {"devops", "ci.bot_1"}
        assert all(re.fullmatch(r"\$2b\$04\$[./A-Za-z0-9]{53}", h) for h in hashes.values())


def test_existing_hashes_ignores_other_lines() -> None:
    assert caddy.existing_hashes(None) == {}
    assert caddy.existing_hashes("") == {}
    text = (
        "admin localhost:2019\n"
        "devops $2b$12$" + "a" * 53 + "\n"  # not indented: not a hash line
        "\tci $2b$12$tooshort\n"
        "\tops $2a$14$" + "b" * 53 + "  \n"
    )
    assert caddy.existing_hashes(text) == {"ops": "$2a$14$" + "b" * 53}


CADDY_VERSION = "v2.6.2 h1:QnKDiR6UQkOWZSvJ1Ws6LLbCfNkOT3OBWDJo7xFTZe8=\n"
CADDYFILE = Path("/etc/caddy/Caddyfile")
# An earlier Caddyfile of the agent's, on the admin address the config keeps.
OLD_CADDYFILE = f"{{\n\tadmin {DEFAULT_CADDY_ADMIN}\n}}\n# old\n"


@pytest.mark.usefixtures("fast_bcrypt")
def test_caddy_validate_failure_keeps_live_file(tmp_path: Path) -> None:
    live = under(tmp_path, CADDYFILE)
    live.parent.mkdir(parents=True)
    live.write_text("old\n")
    runner = FakeRunner()
    runner.on(["caddy", "version"], stdout=CADDY_VERSION)
    runner.on(["caddy", "validate"], rc=1, stderr="Error: adapting config using caddyfile")
    ctx = make_ctx(tmp_path, config(), runner)
    with pytest.raises(StepFailed, match="caddy validate rejected"):
        caddy.converge(ctx)
    assert live.read_text() == "old\n"
    assert not under(tmp_path, host_caddy.CANDIDATE).exists()
    [validate] = runner.ran(["caddy", "validate"])
    assert validate.user == "caddy"
    assert validate.argv[validate.argv.index("--config") + 1] == str(host_caddy.CANDIDATE)


@pytest.mark.usefixtures("fast_bcrypt")
def test_caddy_reload_failure_rolls_back(tmp_path: Path) -> None:
    live = under(tmp_path, CADDYFILE)
    live.parent.mkdir(parents=True)
    live.write_text(OLD_CADDYFILE)
    runner = FakeRunner()
    runner.on(["caddy", "version"], stdout=CADDY_VERSION)
    runner.on(["systemctl", "show"], stdout=ACTIVE_AND_ENABLED)
    runner.on(["caddy", "reload"], rc=1, stderr="Error: loading new config")
    ctx = make_ctx(tmp_path, config(), runner)
    with pytest.raises(StepFailed, match="caddy reload failed"):
        caddy.converge(ctx)
    assert live.read_text() == OLD_CADDYFILE
    assert len(runner.ran(["caddy", "reload"])) == 2  # the new file, then the old one again
    assert ctx.is_pending(paths.CADDY_RELOAD)


@pytest.mark.usefixtures("fast_bcrypt")
def test_caddy_check_mode_without_caddy(tmp_path: Path) -> None:
    runner = FakeRunner().on(["caddy", "version"], rc=127)
    runner.on(["systemctl", "show"], stdout="ActiveState=inactive\nUnitFileState=\n")
    ctx = make_ctx(tmp_path, config(), runner, check=True)
    caddy.converge(ctx)
    assert runner.ran(["caddy", "validate"]) == []
    assert runner.ran(["caddy", "reload"]) == []
    assert ctx.changes == [
        "make directory /var/lib/caddy-admin",
        f"write {CADDYFILE}",
        "enable and start caddy.service",
    ]
    [caddyfile] = [c for c in ctx.files.changes if c.path == CADDYFILE]
    assert "basicauth {" in caddyfile.diff  # 2.6.2 assumed
    assert not (tmp_path / "etc").exists()


def test_caddy_not_installed_fails(tmp_path: Path) -> None:
    runner = FakeRunner().on(["caddy", "version"], rc=127)
    with pytest.raises(StepFailed, match="caddy is not installed"):
        caddy.converge(make_ctx(tmp_path, config(), runner))


# --- Context pending markers ------------------------------------------------------------------


def test_pending_marker_survives_a_new_context(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, config(), FakeRunner())
    ctx.mark_pending("caddy-reload")
    marker = tmp_path / "var/lib/devpi-agent/pending/caddy-reload"
    assert marker.exists()
    assert mode_of(marker.parent) == 0o700
    again = make_ctx(tmp_path, config(), FakeRunner())
    assert again.is_pending("caddy-reload")
    again.clear_pending("caddy-reload")
    assert not marker.exists()
    assert not again.is_pending("caddy-reload")


def test_pending_in_check_mode_stays_in_memory(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, config(), FakeRunner(), check=True)
    ctx.mark_pending("caddy-reload")
    assert ctx.is_pending("caddy-reload")
    assert not (tmp_path / "var").exists()


# --- engine -----------------------------------------------------------------------------------


def ok_step(ctx: Context) -> None:
    pass


def changed_step(ctx: Context) -> None:
    ctx.change("did a thing")
    ctx.change("did another")


def failing_step(ctx: Context) -> None:
    raise StepFailed("could not do it")


def command_failing_step(ctx: Context) -> None:
    ctx.runner.run(["false"])


CANARY = "canary-secret-123"


def crashing_step(ctx: Context) -> None:
    raise ValueError("bad value near " + CANARY)


def steps(*pairs: tuple[str, Any]) -> list[Step]:
    return [Step(name, fn, name) for name, fn in pairs]


def test_run_steps_statuses(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, config(), FakeRunner())
    report = run_steps(ctx, steps(("a", ok_step), ("b", changed_step), ("c", ok_step)))
    assert [(s.name, s.status) for s in report.steps] == [
        ("a", "ok"),
        ("b", "changed"),
        ("c", "ok"),
    ]
    assert report.steps[1].changes == ["did a thing", "did another"]
    assert report.steps[2].changes == []
    assert report.skipped == []
    assert not report.failed
    assert (report.count("ok"), report.count("changed"), report.count("failed")) == (2, 1, 0)


@pytest.mark.parametrize(
    ("fn", "error"),
    [
        (failing_step, "could not do it"),
        (command_failing_step, "`false` exited 1"),
        (crashing_step, "ValueError: bad value near"),
    ],
)
def test_failure_stops_later_steps(tmp_path: Path, fn: Any, error: str) -> None:
    runner = FakeRunner().on(["false"], rc=1)
    ctx = make_ctx(tmp_path, config(), runner)
    report = run_steps(
        ctx, steps(("a", changed_step), ("b", fn), ("c", ok_step), ("d", changed_step))
    )
    assert [(s.name, s.status) for s in report.steps] == [("a", "changed"), ("b", "failed")]
    assert report.steps[1].error is not None
    assert error in report.steps[1].error
    assert report.skipped == ["c", "d"]
    assert report.failed


def test_report_json_and_recap(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, config(), FakeRunner())
    ctx.files.ensure_file(Path("/etc/x"), "x\n", mode=0o644)
    report = run_steps(
        ctx, steps(("a", ok_step), ("b", changed_step), ("c", failing_step), ("d", ok_step))
    )
    document = report.as_json()
    assert set(document) == {"changed", "failed", "steps"}
    assert (document["changed"], document["failed"]) == (1, 1)
    assert [s["name"] for s in document["steps"]] == ["a", "b", "c"]
    for step in document["steps"]:
        assert set(step) == {"name", "status", "seconds", "started"}
        assert isinstance(step["seconds"], float)
    assert [s["status"] for s in document["steps"]] == ["ok", "changed", "failed"]
    json.dumps(document)
    assert re.fullmatch(r"recap: ok=1 changed=1 failed=1 skipped=1 seconds=\d+\.\d", report.recap())
    assert [c.path for c in report.file_changes] == [Path("/etc/x")]


@pytest.fixture
def captured_log(tmp_path: Path, restore_logging: None) -> Iterator[tuple[io.StringIO, Path]]:
    stream = io.StringIO()
    log_file = tmp_path / "log/agent.core.log"
    log.configure(stream=stream, log_file=log_file)
    yield stream, log_file


def test_crash_is_redacted_in_every_log(
    tmp_path: Path, captured_log: tuple[io.StringIO, Path]
) -> None:
    stream, log_file = captured_log
    log.redactor.add(CANARY)
    ctx = make_ctx(tmp_path, config(), FakeRunner())
    report = run_steps(ctx, steps(("boom", crashing_step), ("after", ok_step)))
    assert [s.status for s in report.steps] == ["failed"]
    assert report.skipped == ["after"]
    assert log.agent_log.stream is not None
    log.agent_log.stream.flush()

    console = stream.getvalue()
    in_file = log_file.read_text()
    for text in (console, in_file):
        assert CANARY not in text
        assert "********" in text
        assert "step crashed" in text
        assert "Traceback" in text  # the traceback is kept, redacted
    events = [json.loads(line) for line in in_file.splitlines()]
    crashed = next(e for e in events if e["event"] == "step crashed")
    assert crashed["step"] == "boom"
    assert crashed["error"] == "ValueError: bad value near ********"
    assert mode_of(log_file) & 0o007 == 0  # 0640 before the umask: not world-readable


def test_command_failed_message_is_redacted(tmp_path: Path) -> None:
    secret = "argv-secret-456"
    log.redactor.add(secret)
    runner = FakeRunner().on(["tool"], rc=2, stderr=f"wrong password {secret}\n")
    with pytest.raises(CommandFailed) as info:
        runner.run(["tool", "--password", secret])
    assert secret not in str(info.value)
    assert "`tool --password ********` exited 2" in str(info.value)


# --- engine.single_run ------------------------------------------------------------------------


@pytest.fixture
def held_lock(tmp_path: Path) -> Iterator[Path]:
    lock_file = tmp_path / "run/lock/devpi-agent.lock"
    lock_file.parent.mkdir(parents=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"4242")
    try:
        yield lock_file
    finally:
        os.close(fd)


def test_single_run_times_out_when_locked(held_lock: Path) -> None:
    started = time.monotonic()
    with pytest.raises(LockTimeout) as info, single_run(held_lock, 0.3):
        pytest.fail("the lock is held elsewhere")
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 2
    assert str(held_lock) in str(info.value)
    assert "pid 4242" in str(info.value)


def test_single_run_takes_free_lock_and_writes_pid(tmp_path: Path) -> None:
    lock_file = tmp_path / "run/lock/devpi-agent.lock"
    with single_run(lock_file, 0.3):
        assert lock_file.read_text() == str(os.getpid())
    # released: a second run gets it at once
    with single_run(lock_file, 0):
        pass


def test_lock_file_default() -> None:
    assert Path("/run/lock/devpi-agent.lock") == engine.LOCK_FILE


# --- the basic-auth memo ----------------------------------------------------------------------


def _memo_proofs(tmp_path: Path) -> dict[str, str]:
    text = under(tmp_path, caddy.HASH_MEMO).read_text()
    return dict(line.split(" ", 1) for line in text.splitlines())


@pytest.mark.usefixtures("fast_bcrypt")
def test_memo_cannot_be_checked_with_what_the_caddyfile_holds(tmp_path: Path) -> None:
    """The attack: someone who reads the Caddyfile (group caddy) and gets the memo tests
    password guesses at HMAC-SHA256 speed instead of bcrypt's. The memo's key must be a secret
    that the Caddyfile does not hold."""
    import hashlib
    import hmac

    ctx = make_ctx(tmp_path, config(), FakeRunner())
    rendered = caddy.content(ctx, (2, 6, 2), None)
    bcrypt_hash = caddy.existing_hashes(rendered)["devops"]
    proof = _memo_proofs(tmp_path)["devops"]
    password = ctx.config.users[0].password
    # Every key the Caddyfile offers: the hash itself, its salt, the user's name.
    for key in (bcrypt_hash, bcrypt_hash[:29], f"devops {bcrypt_hash}", "devops"):
        for message in (password, f"devops\0{bcrypt_hash}\0{password}", f"devops {password}"):
            guess = hmac.new(key.encode(), message.encode(), hashlib.sha256).hexdigest()
            assert not hmac.compare_digest(guess, proof), (key, message)
    key_file = under(tmp_path, caddy.MEMO_KEY)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(bytes.fromhex(key_file.read_text().strip())) >= 32


@pytest.mark.usefixtures("fast_bcrypt")
def test_memo_still_spares_a_no_op_the_bcrypt_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = make_ctx(tmp_path, config(), FakeRunner())
    first = caddy.content(ctx, (2, 6, 2), None)
    key = under(tmp_path, caddy.MEMO_KEY).read_text()

    def no_bcrypt(*args: object) -> bool:
        raise AssertionError("bcrypt.checkpw ran although the memo confirmed the pair")

    monkeypatch.setattr(caddy.bcrypt, "checkpw", no_bcrypt)
    assert caddy.content(ctx, (2, 6, 2), first) == first
    assert under(tmp_path, caddy.MEMO_KEY).read_text() == key  # generated once


@pytest.mark.usefixtures("fast_bcrypt")
def test_memo_in_check_mode_writes_no_key(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, config(), FakeRunner(), check=True)
    caddy.content(ctx, (2, 6, 2), None)
    assert not under(tmp_path, caddy.MEMO_KEY).exists()


# --- one accounting path: every file change belongs to the step that made it --------------------


def writes_behind_the_contexts_back(ctx: Context) -> None:
    # A direct Files call, not ctx.write: it must still count as this step's change.
    ctx.files.ensure_file(Path("/etc/example.conf"), "a = 1\n", mode=0o644)


def removes_in_its_own_words(ctx: Context) -> None:
    if ctx.files.exists(Path("/etc/example.conf")) and ctx.change(
        "remove /etc/example.conf (no longer wanted)"
    ):
        ctx.files.remove(Path("/etc/example.conf"))


def test_a_file_written_directly_makes_its_step_changed(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, config(), FakeRunner())
    report = run_steps(ctx, steps(("writer", writes_behind_the_contexts_back), ("c", ok_step)))
    writer = report.steps[0]
    assert (writer.status, writer.changes) == ("changed", ["write /etc/example.conf"])
    assert [fc.path for fc in writer.file_changes] == [Path("/etc/example.conf")]
    assert report.steps[1].file_changes == [] and report.steps[1].status == "ok"


def test_a_change_said_in_the_steps_words_is_not_counted_twice(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/example.conf").write_text("a = 1\n")
    ctx = make_ctx(tmp_path, config(), FakeRunner())
    report = run_steps(ctx, steps(("remover", removes_in_its_own_words)))
    assert report.steps[0].changes == ["remove /etc/example.conf (no longer wanted)"]
    assert len(report.steps[0].file_changes) == 1


def test_plan_prints_each_steps_changes_with_their_diffs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from agent.commands import converge

    def fake_converge(config: Config, *, check: bool, verbose: bool, lock_timeout: float) -> Any:
        ctx = make_ctx(tmp_path, config, FakeRunner(), check=True)
        return run_steps(
            ctx,
            steps(
                ("first", writes_behind_the_contexts_back),
                ("second", lambda c: c.change("restart something")),
            ),
        )

    monkeypatch.setattr(converge, "_converge", fake_converge)
    monkeypatch.setattr(converge, "require_root", lambda command: None)
    config_file = tmp_path / "config.toml"
    config_file.write_text(REFERENCE_TOML)
    result = CliRunner().invoke(converge.plan, ["--config", str(config_file)], obj={"verbose": 0})
    lines = result.output.splitlines()
    first = lines.index("first: would write /etc/example.conf")
    # The diff follows its step's line, before the next step's changes.
    assert lines[first + 1].startswith("--- ") and "+a = 1" in lines
    assert lines.index("+a = 1") < lines.index("second: would restart something")
    assert not (tmp_path / "etc/example.conf").exists()


def test_plan_json_says_what_each_step_would_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from agent.commands import converge

    def fake_converge(config: Config, *, check: bool, verbose: bool, lock_timeout: float) -> Any:
        assert check
        ctx = make_ctx(tmp_path, config, FakeRunner(), check=True)
        return run_steps(
            ctx,
            steps(("first", ok_step), ("second", lambda c: c.change("restart something"))),
        )

    monkeypatch.setattr(converge, "_converge", fake_converge)
    monkeypatch.setattr(converge, "require_root", lambda command: None)
    config_file = tmp_path / "config.toml"
    config_file.write_text(REFERENCE_TOML)
    result = CliRunner().invoke(
        converge.plan, ["--config", str(config_file), "--json"], obj={"verbose": 0}
    )
    assert result.exit_code == 0, result.output
    # Unconfigured, structlog logs to stdout here; the CLI sends it to stderr.
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["changed"] == 1
    assert [(s["name"], s["status"], s["changes"]) for s in report["steps"]] == [
        ("first", "ok", []),
        ("second", "changed", ["restart something"]),
    ]


def test_plan_reports_a_stopped_program_that_apply_would_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host_supervisor, "program_state", lambda ctx, program: "STOPPED")
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, config(), runner, check=True)
    assert host_supervisor.ensure_running(ctx, "devpi-server", restart=False) is False
    assert ctx.changes == ["start devpi-server (was STOPPED)"]
    assert runner.calls == []
