"""Day-2 logic without a host: config of prune/upgrade/backup, verify's verdicts, the client
settings (run through a real bash), passwd, prune planning, the backup schedule, backups'
retention and inventories, and the upgrade's decision, switch-over and fallback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Callable
from configparser import RawConfigParser
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import Call, FakeRunner, make_ctx, program, reference_data, result

from agent.commands import backup as backup_command
from agent.commands import client_config, passwd, verify
from agent.core.config import Config, ConfigError, parse
from agent.core.context import StepFailed
from agent.core.runner import CommandFailed, Result
from agent.host import devpi_data, devpi_swap
from agent.host.devpi_api import RemoteIndex, RemoteUser
from agent.host.tls import CertInfo
from agent.steps import backup as backup_step
from agent.steps import devpi_users, upgrade
from agent.steps import venv as venv_step


def config(**tables: dict[str, Any]) -> Config:
    data = reference_data()
    for name, values in tables.items():
        data.setdefault(name, {}).update(values)
    return parse(data)


# --- config -----------------------------------------------------------------------------------


def test_config_defaults() -> None:
    c = config()
    assert c.devpi.prune is False and c.devpi.upgrade == "auto"
    assert c.backup.enabled and c.backup.dir == Path("/var/backups/devpi")
    assert c.backup.schedule == "daily" and c.backup.keep == 7


@pytest.mark.parametrize(
    ("tables", "key", "message"),
    [
        ({"backup": {"keep": 0}}, "backup.keep", "at least 1"),
        ({"backup": {"dir": "backups"}}, "backup.dir", "absolute"),
        ({"backup": {"dir": "/"}}, "backup.dir", "system directory"),
        ({"backup": {"schedule": "daily; rm -rf /"}}, "backup.schedule", "calendar"),
        ({"backup": {"enabled": "yes"}}, "backup.enabled", "boolean"),
        ({"backup": {"every": "day"}}, "backup.every", "unknown"),
        ({"devpi": {"prune": 1}}, "devpi.prune", "boolean"),
        ({"devpi": {"upgrade": "always"}}, "devpi.upgrade", "not one of"),
    ],
)
def test_config_errors_name_the_key(tables: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        config(**tables)
    assert error.value.key == key
    assert message in str(error.value)


# --- verify -----------------------------------------------------------------------------------

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)


def cert(left: timedelta, *, chain_ok: bool = True) -> CertInfo:
    return CertInfo(
        subject="",
        issuer="CN=Caddy Local Authority",
        names=("127.0.0.1",),
        serial=1,
        not_after=NOW + left,
        days_left=left.days,
        chain_ok=chain_ok,
        verify_error=None if chain_ok else "self-signed certificate",
        sha256="00",
    )


def test_certificate_verdicts() -> None:
    ok, detail = verify.certificate_verdict(cert(timedelta(hours=11)), "internal", NOW)
    assert ok and "in 11.0 h" in detail and "127.0.0.1" in detail
    assert not verify.certificate_verdict(cert(timedelta(minutes=30)), "internal", NOW)[0]
    ok, detail = verify.certificate_verdict(cert(timedelta(days=60)), "acme", NOW)
    assert ok and "in 60.0 days" in detail
    ok, detail = verify.certificate_verdict(cert(timedelta(days=3)), "acme", NOW)
    assert not ok and "renewal is overdue" in detail
    ok, detail = verify.certificate_verdict(cert(timedelta(seconds=-1)), "acme", NOW)
    assert not ok and detail.startswith("expired")
    ok, detail = verify.certificate_verdict(cert(timedelta(days=60), chain_ok=False), "acme", NOW)
    assert not ok and "not trusted: self-signed certificate" in detail


def test_loopback_verdicts() -> None:
    assert verify.loopback_verdict(["127.0.0.1"], 4040).ok
    assert verify.loopback_verdict(["127.0.0.1", "::1", "::ffff:127.0.0.1"], 4040).ok
    exposed = verify.loopback_verdict(["127.0.0.1", "0.0.0.0"], 4040)
    assert not exposed.ok and "0.0.0.0 is reachable" in exposed.detail
    assert not verify.loopback_verdict(["::"], 4040).ok
    nothing = verify.loopback_verdict([], 4040)
    assert not nothing.ok and "nothing listens on port 4040" in nothing.detail


def test_supervisor_verdicts() -> None:
    assert verify.supervisor_verdict("RUNNING", answers=False).ok
    # Right after an apply: supervisord's startsecs have not passed, devpi already answers.
    just_started = verify.supervisor_verdict("STARTING", answers=True)
    assert just_started.ok and "STARTING" in just_started.detail
    assert not verify.supervisor_verdict("STARTING", answers=False).ok
    for state in ("BACKOFF", "FATAL", "STOPPED", "EXITED", None):
        verdict = verify.supervisor_verdict(state, answers=True)
        assert not verdict.ok and f"is {state}" in verdict.detail


def test_file_verdicts(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("x")
    path.chmod(0o600)
    me = verify.pwd.getpwuid(os.getuid()).pw_name
    assert verify.file_verdict("secret-file", path, path.stat(), me).ok
    path.chmod(0o644)
    wrong = verify.file_verdict("secret-file", path, path.stat(), me)
    assert not wrong.ok and f"0644 {me}, must be 0600 {me}" in wrong.detail
    assert not verify.file_verdict("secret-file", path, path.stat(), "someone-else").ok
    assert "does not exist" in verify.file_verdict("secret-file", path, None, me).detail


def test_disk_verdicts() -> None:
    gib = verify.GIB
    assert verify.disk_verdict(Path("/srv"), 100 * gib, 50 * gib).ok
    assert not verify.disk_verdict(Path("/srv"), 100 * gib, 4 * gib).ok  # under 5 %
    assert not verify.disk_verdict(Path("/srv"), 10 * gib, gib // 2).ok  # under 1 GiB


def test_run_checks_turns_errors_into_failed_checks(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, config(), FakeRunner(), check=True)

    def refused(_: Any) -> verify.Check:
        raise ConnectionRefusedError(111, "Connection refused")

    def secret_leak(_: Any) -> verify.Check:
        return verify.passed("leaky", "password is change-me")

    verify.redactor.add("change-me")
    checks = verify.run_checks(ctx, [("proxy-api", refused), ("leaky", secret_leak)])
    assert checks[0] == verify.Check("proxy-api", False, "could not check: Connection refused")
    assert "change-me" not in checks[1].detail
    table = verify.render_table(checks)
    assert "proxy-api" in table and "FAILED" in table and table.endswith("1 ok, 1 failed")
    document = json.loads(verify.as_json(checks))
    assert document["ok"] is False and document["checks"][0]["name"] == "proxy-api"


def test_every_check_is_named_once() -> None:
    names = [name for name, _ in verify.CHECKS]
    assert len(names) == len(set(names)) == 13


# --- client-config ----------------------------------------------------------------------------

PEM = "-----BEGIN CERTIFICATE-----\nMIIBcaddy\n-----END CERTIFICATE-----\n"
TRICKY = "p@ss w'$rd!\\x`y\"z %(h)s"


def settings(password: str = TRICKY, ca: str | None = PEM) -> client_config.ClientSettings:
    return client_config.ClientSettings(
        "devops", password, "devops/pypi", "https://pypi.example.com:8443", ca, None
    )


def test_urls_and_encoding() -> None:
    s = settings()
    assert s.index_url == "https://pypi.example.com:8443/devops/pypi/"
    assert s.simple_url == (
        "https://devops:p%40ss%20w%27%24rd%21%5Cx%60y%22z%20%25%28h%29s"
        "@pypi.example.com:8443/devops/pypi/+simple/"
    )
    assert s.label == "pypi.example.com-8443"


def run_bash(script: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-e"],
        input=script + '\necho "UV=$UV_DEFAULT_INDEX"\necho "SSL=$SSL_CERT_FILE"\n',
        env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )


def read_ini(path: Path) -> RawConfigParser:
    parser = RawConfigParser()
    assert parser.read(path), path
    return parser


def test_bash_output_writes_exact_files(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".pypirc").write_text("[mine]\n")
    run = run_bash(client_config.render(settings(), "all", "bash"), home)
    assert run.returncode == 0, run.stderr
    ca = home / ".config/devpi-agent/pypi.example.com-8443-ca.pem"
    pypirc = read_ini(home / ".pypirc")
    assert pypirc["devpi"]["password"] == TRICKY
    assert pypirc["devpi"]["repository"] == "https://pypi.example.com:8443/devops/pypi/"
    assert pypirc["devpi"]["ca_cert"] == str(ca)
    assert (home / ".pypirc.bak").read_text() == "[mine]\n"
    assert stat.S_IMODE((home / ".pypirc").stat().st_mode) == 0o600
    pip_conf = read_ini(home / ".config/pip/pip.conf")
    assert pip_conf["global"]["index-url"] == settings().simple_url
    assert pip_conf["global"]["cert"] == str(ca)
    assert f"UV={settings().simple_url}\n" in run.stdout
    assert f"SSL={ca}\n" in run.stdout
    bundle = ca.read_text()
    assert bundle.endswith(PEM)
    if Path("/etc/ssl/certs/ca-certificates.crt").exists():
        assert len(bundle) > len(PEM) + 1000  # the system roots came first


@pytest.mark.parametrize("fmt", ["pip", "pypirc", "uv"])
def test_one_format_writes_only_its_settings(tmp_path: Path, fmt: str) -> None:
    text = client_config.render(settings(ca=None), fmt, "bash")  # type: ignore[arg-type]
    assert ("pypirc" in text) == (fmt == "pypirc")
    assert ("pip.conf" in text) == (fmt == "pip")
    assert ("UV_DEFAULT_INDEX" in text) == (fmt == "uv")
    assert "devpi_ca" not in text and "SSL_CERT_FILE" not in text  # no CA without tls internal
    assert run_bash(text, tmp_path).returncode == 0


def test_fish_output_quotes_for_fish() -> None:
    text = client_config.render(settings(password="it's\\here!"), "all", "fish")
    assert "set -gx UV_DEFAULT_INDEX 'https://devops:it%27s%5Chere%21@" in text
    assert "'password = it\\'s\\\\here!'" in text
    assert 'set -g devpi_ca "$HOME/.config/devpi-agent/pypi.example.com-8443-ca.pem"' in text
    assert 'set -gx SSL_CERT_FILE "$devpi_ca"' in text
    assert "export" not in text


def test_settings_for_picks_the_users_first_index() -> None:
    data = reference_data()
    data["users"].append({"name": "ci", "password": "ci-password"})
    data["indexes"] += [{"name": "ci/dev", "bases": ["devops/pypi"]}, {"name": "ci/rel"}]
    c = parse(data)
    assert client_config.settings_for(c, "ci", None, None, None).index == "ci/dev"
    assert client_config.settings_for(c, "ci", "devops/pypi", None, None).index == "devops/pypi"
    with pytest.raises(LookupError, match="not in the config"):
        client_config.settings_for(c, "nobody", None, None, None)
    with pytest.raises(LookupError, match="index 'ci/nope'"):
        client_config.settings_for(c, "ci", "ci/nope", None, None)
    data["users"].append({"name": "reader", "password": "reader-password"})
    with pytest.raises(LookupError, match="has no index"):
        client_config.settings_for(parse(data), "reader", None, None, None)


# --- passwd -----------------------------------------------------------------------------------


def passwd_config(tmp_path: Path, inline: bool = False) -> Path:
    password_file = tmp_path / "ci.pass"
    password_file.write_text("old-password-1\n")
    password_file.chmod(0o600)
    user = 'password = "inline-pass-1"' if inline else f'password_file = "{password_file}"'
    path = tmp_path / "config.toml"
    path.write_text(f'[server]\ndomain = "pypi.example.com"\n[[users]]\nname = "ci"\n{user}\n')
    return path


@pytest.fixture
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.commands.support.os.geteuid", lambda: 0)


@pytest.mark.usefixtures("as_root")
def test_passwd_writes_the_file_private(tmp_path: Path) -> None:
    path = passwd_config(tmp_path)
    run = CliRunner().invoke(
        passwd.passwd, ["--config", str(path), "ci", "--stdin"], input="new-password-2\n"
    )
    assert run.exit_code == 0, run.output
    written = tmp_path / "ci.pass"
    assert written.read_text() == "new-password-2\n"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert "new-password-2" not in run.output and "devpi-agent apply" in run.output


@pytest.mark.usefixtures("as_root")
def test_passwd_generates_and_prompts(tmp_path: Path) -> None:
    path = passwd_config(tmp_path)
    run = CliRunner().invoke(passwd.passwd, ["--config", str(path), "ci", "--generate"])
    assert run.exit_code == 0, run.output
    generated = (tmp_path / "ci.pass").read_text().strip()
    assert len(generated) == 32 and generated not in run.output
    run = CliRunner().invoke(
        passwd.passwd, ["--config", str(path), "ci"], input="typed-pass-3\ntyped-pass-3\n"
    )
    assert run.exit_code == 0, run.output
    assert (tmp_path / "ci.pass").read_text() == "typed-pass-3\n"


@pytest.mark.usefixtures("as_root")
@pytest.mark.parametrize(
    ("args", "stdin", "inline", "code", "message"),
    [
        (["ci", "--stdin"], "Q7zQ7z\n", False, 1, "shorter than 8"),
        (["ci", "--stdin"], "old-password-1\n", False, 1, "already"),
        (["ci", "--stdin"], "new-password\n", True, 2, "inline"),
        (["bob", "--stdin"], "new-password\n", False, 2, "not in the config"),
        (["ci", "--stdin", "--generate"], "", False, 2, "at most one"),
    ],
)
def test_passwd_refuses(
    tmp_path: Path, args: list[str], stdin: str, inline: bool, code: int, message: str
) -> None:
    path = passwd_config(tmp_path, inline=inline)
    run = CliRunner().invoke(passwd.passwd, ["--config", str(path), *args], input=stdin)
    assert run.exit_code == code, run.output
    assert message in run.stderr
    if not inline:
        assert (tmp_path / "ci.pass").read_text() == "old-password-1\n"


# --- prune ------------------------------------------------------------------------------------


def remote(**users: dict[str, tuple[str, ...]]) -> dict[str, RemoteUser]:
    """Users and their indexes as devpi lists them; root/pypi is the mirror the agent makes."""

    def index(user: str, name: str, bases: tuple[str, ...]) -> RemoteIndex:
        if (user, name) == ("root", "pypi"):
            return RemoteIndex("root/pypi", (), "mirror", no_project_list=True)
        return RemoteIndex(f"{user}/{name}", bases)

    return {
        name: RemoteUser(name, {i: index(name, i, bases) for i, bases in indexes.items()})
        for name, indexes in users.items()
    }


class FakeApi:
    def __init__(self, users: dict[str, RemoteUser]) -> None:
        self.remote = users
        self.calls: list[tuple[str, ...]] = []
        self.uuid: str | None = None
        self.serial: str | None = None

    def users(self) -> dict[str, RemoteUser]:
        return self.remote

    def password_matches(self, user: str, password: str) -> bool:
        return True

    def login(self, user: str, password: str) -> bool:
        self.calls.append(("login", user))
        return True

    def delete_index(self, user: str, index: str) -> None:
        self.calls.append(("delete_index", f"{user}/{index}"))

    def create_pypi_mirror(self, user: str, index: str, *, no_project_list: bool) -> None:
        self.calls.append(("create_pypi_mirror", f"{user}/{index}", str(no_project_list)))

    def set_no_project_list(self, user: str, index: str, no_project_list: bool) -> None:
        self.calls.append(("set_no_project_list", f"{user}/{index}", str(no_project_list)))

    def delete_user(self, user: str) -> None:
        self.calls.append(("delete_user", user))


SERVER = remote(
    root={"pypi": ()},
    devops={"pypi": ("root/pypi",), "old": ("devops/pypi",)},
    gone={"base": ("root/pypi",), "child": ("gone/base",)},
)


def test_prune_plan_never_touches_root_and_deletes_children_first(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, config(devpi={"prune": True}), FakeRunner())
    indexes, users = devpi_users.prune_plan(ctx, SERVER)
    assert indexes == ["devops/old", "gone/child", "gone/base"]
    assert users == ["gone"]


def test_prune_is_off_by_default(tmp_path: Path) -> None:
    api = FakeApi(SERVER)
    ctx = make_ctx(tmp_path, config(), FakeRunner())
    devpi_users._converge(ctx, api)  # type: ignore[arg-type]
    assert api.calls == [] and ctx.changes == []


def test_prune_plans_then_deletes(tmp_path: Path) -> None:
    (tmp_path / "etc/devpi-agent").mkdir(parents=True)
    (tmp_path / "etc/devpi-agent/root.pass").write_text("root-password-1\n")
    api = FakeApi(SERVER)
    planned = make_ctx(tmp_path, config(devpi={"prune": True}), FakeRunner(), check=True)
    devpi_users._converge(planned, api)  # type: ignore[arg-type]
    assert api.calls == []
    assert planned.changes == [
        "delete index devops/old and its uploads (devpi.prune = true)",
        "delete index gone/child and its uploads (devpi.prune = true)",
        "delete index gone/base and its uploads (devpi.prune = true)",
        "delete devpi user gone (devpi.prune = true)",
    ]
    ctx = make_ctx(tmp_path, config(devpi={"prune": True}), FakeRunner())
    devpi_users._converge(ctx, api)  # type: ignore[arg-type]
    assert api.calls == [
        ("login", "root"),
        ("delete_index", "devops/old"),
        ("delete_index", "gone/child"),
        ("delete_index", "gone/base"),
        ("delete_user", "gone"),
    ]


# --- root/pypi, the PyPI mirror ---------------------------------------------------------------


def with_root_password(tmp_path: Path) -> None:
    (tmp_path / "etc/devpi-agent").mkdir(parents=True, exist_ok=True)
    (tmp_path / "etc/devpi-agent/root.pass").write_text("root-password-1\n")


def test_missing_mirror_is_made_without_a_project_list(tmp_path: Path) -> None:
    with_root_password(tmp_path)
    server = remote(root={}, devops={"pypi": ("root/pypi",)})
    planned = make_ctx(tmp_path, config(), FakeRunner(), check=True)
    api = FakeApi(server)
    devpi_users._converge(planned, api)  # type: ignore[arg-type]
    assert api.calls == []
    assert planned.changes == ["create the PyPI mirror root/pypi (project list: off)"]
    ctx = make_ctx(tmp_path, config(), FakeRunner())
    devpi_users._converge(ctx, api)  # type: ignore[arg-type]
    assert api.calls == [("login", "root"), ("create_pypi_mirror", "root/pypi", "True")]


def test_mirror_made_before_the_indexes_based_on_it(tmp_path: Path) -> None:
    with_root_password(tmp_path)
    api = FakeApi(remote(root={}))

    def create_index(user: str, index: str, bases: tuple[str, ...]) -> None:
        api.calls.append(("create_index", f"{user}/{index}"))

    api.create_index = create_index  # type: ignore[attr-defined]
    api.create_user = lambda user, password: api.calls.append(("create_user", user))  # type: ignore[attr-defined]
    devpi_users._converge(make_ctx(tmp_path, config(), FakeRunner()), api)  # type: ignore[arg-type]
    assert api.calls == [
        ("login", "root"),
        ("create_pypi_mirror", "root/pypi", "True"),
        ("create_user", "devops"),
        ("create_index", "devops/pypi"),
    ]


def test_an_earlier_hosts_mirror_gets_the_option_and_back(tmp_path: Path) -> None:
    with_root_password(tmp_path)
    listed = RemoteIndex("root/pypi", (), "mirror", no_project_list=False)
    server = {**SERVER, "root": RemoteUser("root", {"pypi": listed})}
    api = FakeApi(server)
    ctx = make_ctx(tmp_path, config(), FakeRunner())
    devpi_users._converge(ctx, api)  # type: ignore[arg-type]
    assert ctx.changes == ["set mirror_no_project_list=True on root/pypi"]
    assert api.calls[-1] == ("set_no_project_list", "root/pypi", "True")

    # Asked for, the project list comes back; a converged mirror is left alone.
    api = FakeApi(SERVER)
    ctx = make_ctx(tmp_path, config(devpi={"mirror_project_list": True}), FakeRunner())
    devpi_users._converge(ctx, api)  # type: ignore[arg-type]
    assert api.calls[-1] == ("set_no_project_list", "root/pypi", "False")
    api = FakeApi(server)
    ctx = make_ctx(tmp_path, config(devpi={"mirror_project_list": True}), FakeRunner())
    devpi_users._converge(ctx, api)  # type: ignore[arg-type]
    assert api.calls == [] and ctx.changes == []


# --- the backup schedule ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "cron"),
    [
        ("daily", "0 0 * * *"),
        ("hourly", "0 * * * *"),
        ("weekly", "0 0 * * 1"),
        ("monthly", "0 0 1 * *"),
        ("03:30", "30 3 * * *"),
        ("*-*-* 23:05:00", "5 23 * * *"),
        ("Mon *-*-* 03:00", None),
        ("25:00", None),
    ],
)
def test_cron_schedule(schedule: str, cron: str | None) -> None:
    assert backup_step.cron_schedule(schedule) == cron


def systemd_runner(enabled: str = "disabled", active: str = "inactive") -> FakeRunner:
    shown = f"UnitFileState={enabled}\nActiveState={active}\n"
    return FakeRunner().on(["systemctl", "show", "devpi-agent-backup.timer"], stdout=shown)


def test_backup_timer_under_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEX", "/usr/local/sbin/devpi-agent")
    runner = systemd_runner()
    ctx = make_ctx(tmp_path, config(backup={"schedule": "03:30"}), runner)
    backup_step.converge(ctx)
    service = (tmp_path / "etc/systemd/system/devpi-agent-backup.service").read_text()
    timer = (tmp_path / "etc/systemd/system/devpi-agent-backup.timer").read_text()
    assert "ExecStart=/usr/local/sbin/devpi-agent backup --config /etc/devpi-agent/config.toml" in (
        service
    )
    assert "OnCalendar=03:30\n" in timer and "Persistent=true" in timer
    assert [c.argv for c in runner.calls if c.argv[1] != "show"] == [
        ("systemd-analyze", "calendar", "03:30"),
        ("systemctl", "daemon-reload"),
        ("systemctl", "enable", "devpi-agent-backup.timer"),
        ("systemctl", "restart", "devpi-agent-backup.timer"),
    ]
    assert (tmp_path / "var/backups/devpi").is_dir()
    again = make_ctx(
        tmp_path, config(backup={"schedule": "03:30"}), systemd_runner("enabled", "active")
    )
    backup_step.converge(again)
    assert again.changes == []


def test_backup_schedule_systemd_rejects(tmp_path: Path) -> None:
    runner = systemd_runner().on(["systemd-analyze"], rc=1, stderr="Failed to parse: nope")
    ctx = make_ctx(tmp_path, config(backup={"schedule": "nope"}), runner)
    with pytest.raises(StepFailed, match="not a systemd calendar expression"):
        backup_step.converge(ctx)
    assert not (tmp_path / "etc/systemd/system/devpi-agent-backup.timer").exists()


def test_backup_by_cron_without_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEX", "/opt/agent/devpi-agent")
    monkeypatch.setattr(backup_step, "program_state", lambda ctx, name: "RUNNING")
    runner = FakeRunner().on(["dpkg-query"], stdout="cron\tun \t\n")
    ctx = make_ctx(tmp_path, config(), runner, systemd=False)
    backup_step.converge(ctx)
    cron = (tmp_path / "etc/cron.d/devpi-agent-backup").read_text()
    assert "\n0 0 * * * root /opt/agent/devpi-agent backup --config " in cron
    assert any(c.argv[-1] == "cron" and "install" in c.argv for c in runner.calls)
    assert (tmp_path / "etc/supervisor/conf.d/cron.conf").exists()
    weekly_on_monday = config(backup={"schedule": "Mon *-*-* 03:00"})
    with pytest.raises(StepFailed, match="cannot be expressed for cron"):
        backup_step.converge(make_ctx(tmp_path, weekly_on_monday, FakeRunner(), systemd=False))


def test_backup_disabled_removes_the_schedule(tmp_path: Path) -> None:
    for name in ("devpi-agent-backup.service", "devpi-agent-backup.timer"):
        path = tmp_path / "etc/systemd/system" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, config(backup={"enabled": False}), runner)
    backup_step.converge(ctx)
    assert not list((tmp_path / "etc/systemd/system").iterdir())
    assert runner.calls[0].argv == ("systemctl", "disable", "--now", "devpi-agent-backup.timer")


# --- backups and inventories ------------------------------------------------------------------


def write_export(directory: Path, files: dict[str, str]) -> Path:
    """A minimal devpi export: dataindex.json listing `files` (relpath -> sha256)."""
    indexes: dict[str, Any] = {}
    for relpath, digest in files.items():
        index = "/".join(relpath.split("/")[:2])
        entry = {
            "type": "releasefile",
            "relpath": relpath,
            "entrymapping": {"hash_spec": f"sha256={digest}", "hashes": {"sha256": digest}},
        }
        indexes.setdefault(index, {"files": []})["files"].append(entry)
    indexes["devops/pypi"]["files"].append({"type": "doczip", "relpath": "devops/pypi/x.zip"})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "dataindex.json").write_text(json.dumps({"indexes": indexes}))
    return directory


def test_export_inventory_and_missing_files(tmp_path: Path) -> None:
    export = write_export(
        tmp_path / "export",
        {"devops/pypi/pkg/1.0/pkg-1.0.whl": "aa", "ci/dev/other/2/other-2.tar.gz": "bb"},
    )
    expected = devpi_data.export_inventory(export)
    assert expected == {
        devpi_data.StoredFile("devops/pypi", "pkg-1.0.whl", "aa"),
        devpi_data.StoredFile("ci/dev", "other-2.tar.gz", "bb"),
    }
    served = {devpi_data.StoredFile("devops/pypi", "pkg-1.0.whl", "aa")}
    missing = devpi_data.missing_files(expected, served)
    assert devpi_data.describe_missing(missing) == "1 files missing: ci/dev/other-2.tar.gz"
    corrupted = {*served, devpi_data.StoredFile("ci/dev", "other-2.tar.gz", "cc")}
    assert devpi_data.missing_files(expected, corrupted) == sorted(expected - served)


def test_prune_backups_keeps_the_newest_and_foreign_files(tmp_path: Path) -> None:
    names = ["20261101T000000Z", "20261102T000000Z", "20261103T000000Z"]
    for name in [*names, ".20261104T000000Z.partial", "notes"]:
        (tmp_path / name).mkdir()
    pruned = backup_command.prune_backups(tmp_path, keep=2)
    assert pruned == [tmp_path / names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".20261104T000000Z.partial",
        *names[1:],
        "notes",
    ]


def test_make_backup_exports_then_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def export(call: Call) -> Result:
        write_export(tmp_path / call.argv[-1].lstrip("/"), {"devops/pypi/p/1/p-1.whl": "aa"})
        return result(call.argv)

    runner = FakeRunner().on(program("devpi-export"), export)
    ctx = make_ctx(tmp_path, config(backup={"keep": 1}), runner)
    (tmp_path / "var/backups/devpi/20200101T000000Z").mkdir(parents=True)
    (tmp_path / "var/backups/devpi").chmod(0o700)  # as the agent made it
    done = backup_command.make_backup(ctx)
    [call] = runner.calls
    assert call.user == "devpi" and Path(call.argv[-1]).name.endswith(".partial")
    assert devpi_data.BACKUP_NAME.fullmatch(done.path.name)
    assert [p.name for p in (tmp_path / "var/backups/devpi").iterdir()] == [done.path.name]
    assert done.pruned[0].name == "20200101T000000Z" and done.files == 1


def test_a_failed_export_leaves_no_partial_backup(tmp_path: Path) -> None:
    runner = FakeRunner().on(program("devpi-export"), rc=1, stderr="disk full")
    ctx = make_ctx(tmp_path, config(), runner)
    with pytest.raises(Exception, match="disk full"):
        backup_command.make_backup(ctx)
    assert list((tmp_path / "var/backups/devpi").iterdir()) == []


# --- upgrades ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("installed", "wanted", "mode", "expected"),
    [
        (None, "7.0.0", "auto", False),
        ("6.20.3", "6.20.3", "auto", False),
        ("6.19.3", "6.20.3", "auto", False),
        ("6.20.3", "7.0.0", "auto", True),
        ("6.19.3", "6.20.3", "export-import", True),
        ("6.20.3", "6.20.3", "export-import", False),
    ],
)
def test_needs_export_import(installed: str | None, wanted: str, mode: str, expected: bool) -> None:
    assert upgrade.needs_export_import(installed, wanted, mode) is expected


VENV = Path("/opt/devpi-agent/venv")
SERVERDIR = Path("/var/lib/devpi/server")


def fake_venv(root: Path, server: str) -> None:
    site = root / VENV.relative_to("/") / "lib/python3.11/site-packages"
    site.mkdir(parents=True, exist_ok=True)
    for dist in site.glob("devpi_server-*"):
        dist.rmdir()
    (site / f"devpi_server-{server}.dist-info").mkdir()
    (root / VENV.relative_to("/") / "bin").mkdir(exist_ok=True)
    (root / VENV.relative_to("/") / "bin/python").touch()


def fake_serverdir(root: Path, name: str = "server", marker: str = "old data") -> Path:
    path = root / "var/lib/devpi" / name
    path.mkdir(parents=True, exist_ok=True)
    (path / ".nodeinfo").write_text("{}")
    (path / "marker").write_text(marker)
    return path


def fake_devpi(
    monkeypatch: pytest.MonkeyPatch,
    caller: Any,
    events: list[str],
    served: Callable[[], set[devpi_data.StoredFile]],
) -> None:
    """devpi's stop and start as events, and what it serves, wherever the switch calls them."""
    for module in (caller, devpi_swap):
        monkeypatch.setattr(module, "stop_devpi", lambda ctx: events.append("stop"))
    monkeypatch.setattr(devpi_swap, "start_devpi", lambda ctx: events.append("start"))
    monkeypatch.setattr(devpi_swap, "served_inventory", lambda api: served())


@pytest.fixture
def upgrade_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """6.19.3 installed with data; devpi's start/stop and its HTTP API faked."""
    fake_venv(tmp_path, "6.19.3")
    fake_serverdir(tmp_path)
    events: list[str] = []
    served = {"files": {devpi_data.StoredFile("devops/pypi", "p-1.whl", "aa")}}
    fake_devpi(monkeypatch, upgrade, events, lambda: served["files"])
    monkeypatch.setattr(upgrade, "warm_mirror", lambda ctx: events.append("warm"))

    def build_venv(ctx: Any) -> None:
        events.append("venv")
        fake_venv(tmp_path, "6.20.3")

    monkeypatch.setattr(upgrade, "ensure_venv", build_venv)

    def export(call: Call) -> Result:
        write_export(tmp_path / call.argv[-1].lstrip("/"), {"devops/pypi/p/1/p-1.whl": "aa"})
        return result(call.argv)

    def import_(call: Call) -> Result:
        fake_serverdir(tmp_path, Path(call.argv[call.argv.index("--serverdir") + 1]).name, "new")
        return result(call.argv)

    runner = FakeRunner().on(program("devpi-export"), export).on(program("devpi-import"), import_)
    return {"runner": runner, "events": events, "served": served, "root": tmp_path}


UPGRADE = {"devpi": {"upgrade": "export-import"}}


def test_upgrade_by_export_and_import(upgrade_host: dict[str, Any]) -> None:
    root: Path = upgrade_host["root"]
    ctx = make_ctx(root, config(**UPGRADE), upgrade_host["runner"])
    upgrade.converge(ctx)
    assert ctx.changes == ["upgrade devpi-server 6.19.3 -> 6.20.3 by export and import"]
    assert upgrade_host["events"] == ["stop", "venv", "start", "warm"]
    assert upgrade.installed_server_version(ctx) == "6.20.3"
    assert (root / "var/lib/devpi/server/marker").read_text() == "new"
    [old] = (root / "var/lib/devpi").glob("server.6.19.3-*")
    assert (old / "marker").read_text() == "old data"
    assert list((root / "var/lib/devpi").glob("export-6.19.3-*/dataindex.json"))
    assert not (root / "opt/devpi-agent/venv.previous-6.19.3").exists()
    assert not (root / "var/lib/devpi-agent/upgrade.json").exists()
    export, import_ = upgrade_host["runner"].calls
    assert export.user == import_.user == "devpi"
    assert "--no-events" in import_.argv


def test_upgrade_falls_back_when_files_are_missing(upgrade_host: dict[str, Any]) -> None:
    root: Path = upgrade_host["root"]
    upgrade_host["served"]["files"] = set()
    ctx = make_ctx(root, config(**UPGRADE), upgrade_host["runner"])
    with pytest.raises(StepFailed, match=r"6\.19\.3 runs again .* 1 files missing"):
        upgrade.converge(ctx)
    assert upgrade.installed_server_version(ctx) == "6.19.3"
    assert (root / "var/lib/devpi/server/marker").read_text() == "old data"
    assert [p.name for p in (root / "var/lib/devpi").glob("server.upgrade-*-failed")]
    assert upgrade_host["events"] == ["stop", "venv", "start", "stop", "start"]
    assert not (root / "var/lib/devpi-agent/upgrade.json").exists()


def test_upgrade_falls_back_when_the_import_fails(upgrade_host: dict[str, Any]) -> None:
    root: Path = upgrade_host["root"]
    runner = FakeRunner().on(program("devpi-import"), rc=1, stderr="boom")
    runner.rules[:0] = upgrade_host["runner"].rules[:1]  # the export still works
    ctx = make_ctx(root, config(**UPGRADE), runner)
    with pytest.raises(StepFailed, match="boom"):
        upgrade.converge(ctx)
    assert upgrade.installed_server_version(ctx) == "6.19.3"
    assert (root / "var/lib/devpi/server/marker").read_text() == "old data"
    assert not list((root / "var/lib/devpi").glob("server.upgrade-*"))


def test_an_upgrade_cut_short_is_undone_first(upgrade_host: dict[str, Any]) -> None:
    root: Path = upgrade_host["root"]
    # As if killed after the venv move: the old venv aside, a half-built one in place.
    old_venv = root / "opt/devpi-agent/venv.previous-6.19.3"
    (root / "opt/devpi-agent/venv").rename(old_venv)
    (root / "opt/devpi-agent/venv/bin").mkdir(parents=True)
    record = upgrade.Migration(
        "6.19.3",
        "6.20.3",
        str(VENV.with_name("venv.previous-6.19.3")),
        "/var/lib/devpi/server.6.19.3-x",
        "/var/lib/devpi/server.upgrade-x",
        "/var/lib/devpi/export-6.19.3-x",
    )
    state = root / "var/lib/devpi-agent/upgrade.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps(upgrade.asdict(record)))
    ctx = make_ctx(root, config(), upgrade_host["runner"])  # "auto": no new attempt
    upgrade.converge(ctx)
    assert ctx.changes == ["undo an upgrade that was cut short"]
    assert upgrade.installed_server_version(ctx) == "6.19.3"
    assert not old_venv.exists() and not state.exists()


@pytest.mark.parametrize("cut_after", ["live-moved", "switched"])
def test_a_switch_cut_short_is_rolled_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut_after: str
) -> None:
    """The roll-back upgrade and restore share, from each state between the two renames."""
    events: list[str] = []
    fake_devpi(monkeypatch, upgrade, events, set)
    swap = devpi_swap.Swap.beside(SERVERDIR, staging="new", previous="old", failed="failed")
    fake_serverdir(tmp_path, "server.old")
    fake_serverdir(tmp_path, "server.new" if cut_after == "live-moved" else "server", "new")
    devpi_swap.roll_back(make_ctx(tmp_path, config(), FakeRunner()), swap)
    devpi = tmp_path / "var/lib/devpi"
    assert (devpi / "server/marker").read_text() == "old data"
    kept = ["server", "server.failed"] if cut_after == "switched" else ["server"]
    assert sorted(p.name for p in devpi.iterdir()) == kept
    assert events == ["stop", "start"]


def test_no_upgrade_without_data_or_downwards(upgrade_host: dict[str, Any]) -> None:
    root: Path = upgrade_host["root"]
    ctx = make_ctx(
        root,
        config(devpi={"server_version": "6.18.0", "unlocked": True, **UPGRADE["devpi"]}),
        FakeRunner(),
    )
    with pytest.raises(StepFailed, match=r"older than the installed 6\.19\.3"):
        upgrade.converge(ctx)
    (root / "var/lib/devpi/server/.nodeinfo").unlink()
    fresh = make_ctx(root, config(**UPGRADE), FakeRunner())
    upgrade.converge(fresh)
    assert fresh.changes == []
    planned = make_ctx(root / "none", config(**UPGRADE), FakeRunner(), check=True)
    upgrade.converge(planned)
    assert planned.changes == []
    assert venv_step.NAME == "venv"


# --- restore ----------------------------------------------------------------------------------


@pytest.fixture
def restore_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A converged host (venv, config, root password, server dir) with devpi faked."""
    fake_venv(tmp_path, "6.20.3")
    (tmp_path / "opt/devpi-agent/venv/bin/devpi-import").touch()
    (tmp_path / "etc/devpi-server").mkdir(parents=True)
    (tmp_path / "etc/devpi-server/devpi-server.yml").write_text("devpi-server: {}\n")
    (tmp_path / "etc/devpi-agent").mkdir(parents=True)
    (tmp_path / "etc/devpi-agent/root.pass").write_text("this-hosts-root-pw\n")
    fake_serverdir(tmp_path)
    export = write_export(tmp_path / "backup", {"devops/pypi/p/1/p-1.whl": "aa"})
    state: dict[str, Any] = {"uploads": [], "events": [], "root": tmp_path, "export": export}
    state["served"] = {devpi_data.StoredFile("devops/pypi", "p-1.whl", "aa")}
    m = backup_command
    monkeypatch.setattr(m, "devpi_api_answers", lambda port: True)
    monkeypatch.setattr(m, "existing_uploads", lambda api: state["uploads"])
    fake_devpi(monkeypatch, m, state["events"], lambda: state["served"])
    monkeypatch.setattr(m, "warm_mirror", lambda ctx: None)
    monkeypatch.setattr(m.devpi_users, "converge", lambda ctx: state["events"].append("users"))

    def import_(call: Call) -> Result:
        fake_serverdir(tmp_path, Path(call.argv[call.argv.index("--serverdir") + 1]).name, "new")
        return result(call.argv)

    state["runner"] = FakeRunner().on(program("devpi-import"), import_).on(["test", "-r"], rc=1)
    return state


def test_restore_switches_to_the_imported_data(restore_host: dict[str, Any]) -> None:
    root: Path = restore_host["root"]
    runner: FakeRunner = restore_host["runner"]
    ctx = make_ctx(root, config(), runner)
    done = backup_command.restore(ctx, restore_host["export"], force=False)
    assert done.files == 1 and done.previous is not None
    assert (root / "var/lib/devpi/server/marker").read_text() == "new"
    assert (root / done.previous.relative_to("/") / "marker").read_text() == "old data"
    assert restore_host["events"] == ["stop", "start", "users"]
    # Not readable by the service user: imported from a copy, removed afterwards.
    [chown] = runner.ran(["chown"])
    [import_call] = runner.ran_program("devpi-import")
    assert "/var/lib/devpi/.restore-source-" in chown.argv[-1] == import_call.argv[-1]
    assert not list((root / "var/lib/devpi").glob(".restore-source-*"))
    [passwd_call] = runner.ran(["setsid"])
    assert passwd_call.input == "this-hosts-root-pw\nthis-hosts-root-pw\n"
    assert passwd_call.user == "devpi" and "this-hosts-root-pw" not in " ".join(passwd_call.argv)


def test_restore_refuses_a_server_with_uploads(restore_host: dict[str, Any]) -> None:
    restore_host["uploads"] = ["devops/pypi: mine"]
    ctx = make_ctx(restore_host["root"], config(), restore_host["runner"])
    with pytest.raises(StepFailed, match=r"already holds uploads \(devops/pypi: mine\)"):
        backup_command.restore(ctx, restore_host["export"], force=False)
    assert restore_host["events"] == []
    backup_command.restore(ctx, restore_host["export"], force=True)
    assert restore_host["events"] == ["stop", "start", "users"]


def test_restore_puts_the_old_data_back_when_files_are_missing(
    restore_host: dict[str, Any],
) -> None:
    root: Path = restore_host["root"]
    restore_host["served"] = set()
    ctx = make_ctx(root, config(), restore_host["runner"])
    with pytest.raises(StepFailed, match="1 files missing"):
        backup_command.restore(ctx, restore_host["export"], force=False)
    assert (root / "var/lib/devpi/server/marker").read_text() == "old data"
    assert list((root / "var/lib/devpi").glob("server.failed-restore-*"))
    assert restore_host["events"] == ["stop", "start", "stop", "start"]


def test_a_failed_restore_import_leaves_devpi_serving(restore_host: dict[str, Any]) -> None:
    root: Path = restore_host["root"]
    runner = FakeRunner().on(program("devpi-import"), rc=1, stderr="boom").on(["test", "-r"])
    ctx = make_ctx(root, config(), runner)
    with pytest.raises(CommandFailed, match="boom"):
        backup_command.restore(ctx, restore_host["export"], force=False)
    assert restore_host["events"] == []  # never stopped: the import ran beside the live data
    assert sorted(p.name for p in (root / "var/lib/devpi").iterdir()) == ["server"]


def test_restore_refuses_what_is_not_an_export(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, config(), FakeRunner())
    with pytest.raises(StepFailed, match="not a devpi export"):
        backup_command.restore(ctx, tmp_path, force=False)


@pytest.mark.usefixtures("as_root")
def test_client_config_command_trusts_a_company_acme_root(tmp_path: Path) -> None:
    root_pem = tmp_path / "company-root.pem"
    root_pem.write_text(PEM)
    path = tmp_path / "config.toml"
    path.write_text(
        '[server]\ndomain = "pypi.example.com"\nacme_ca = "https://ca.example.com/directory"\n'
        f'acme_ca_root = "{root_pem}"\n[[users]]\nname = "ci"\npassword = "ci-password-1"\n'
        '[[indexes]]\nname = "ci/dev"\n'
    )
    run = CliRunner().invoke(client_config.client_config, ["--config", str(path), "--user", "ci"])
    assert run.exit_code == 0, run.output
    assert "'MIIBcaddy'" in run.stdout and f"({root_pem} on the server)" in run.stdout
    assert "index-url = https://ci:ci-password-1@pypi.example.com/ci/dev/+simple/" in run.stdout
    plain = path.read_text().replace(f'acme_ca_root = "{root_pem}"\n', "")
    path.write_text(plain)
    run = CliRunner().invoke(client_config.client_config, ["--config", str(path), "--user", "ci"])
    assert run.exit_code == 0 and "devpi_ca" not in run.stdout


def _poison(export: Path, kind: str, tmp_path: Path) -> str:
    """Plant one entry restore must never copy as root; the entry's path inside the export."""
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$secret-hash:19000:0:99999:7:::\n")
    nested = export / "devops" / "pypi"
    nested.mkdir(parents=True, exist_ok=True)
    if kind == "file-link":
        (nested / "shadow").symlink_to(secret)
        return "devops/pypi/shadow"
    if kind == "dir-link":
        (export / "etc").symlink_to(tmp_path)
        return "etc"
    if kind == "fifo":
        os.mkfifo(nested / "pipe")
        return "devops/pypi/pipe"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["file-link", "dir-link", "fifo"])
def test_restore_refuses_an_export_with_links_or_special_files(
    restore_host: dict[str, Any], tmp_path: Path, kind: str
) -> None:
    """The attack: an export holding a link to /etc/shadow (or a fifo to hang the copy) is
    copied by root into the service user's home and chowned to it. Refused before anything."""
    root: Path = restore_host["root"]
    runner: FakeRunner = restore_host["runner"]
    entry = _poison(restore_host["export"], kind, tmp_path)
    before = sorted(p.name for p in (root / "var/lib/devpi").iterdir())
    ctx = make_ctx(root, config(), runner)
    with pytest.raises(StepFailed, match=rf"{entry}\b.*(symlink|fifo)") as refused:
        backup_command.restore(ctx, restore_host["export"], force=False)
    assert "refused" in str(refused.value)
    assert runner.calls == [] and restore_host["events"] == []
    assert sorted(p.name for p in (root / "var/lib/devpi").iterdir()) == before
    assert (root / "var/lib/devpi/server/marker").read_text() == "old data"


def test_export_check_names_devices_and_accepts_a_clean_export(tmp_path: Path) -> None:
    export = write_export(tmp_path / "export", {"devops/pypi/p/1/p-1.whl": "aa"})
    (export / "devops/pypi/p/1").mkdir(parents=True)
    (export / "devops/pypi/p/1/p-1.whl").write_bytes(b"wheel")
    devpi_data.check_export_entries(export)  # a clean export passes
    # A device node cannot be made without root; its verdict comes from the same mode check.
    assert devpi_data.special_kind(stat.S_IFCHR | 0o600) == "character device"
    assert devpi_data.special_kind(stat.S_IFBLK | 0o600) == "block device"
    assert devpi_data.special_kind(stat.S_IFSOCK | 0o600) == "socket"
    assert devpi_data.special_kind(stat.S_IFREG | 0o600) is None
    assert devpi_data.special_kind(stat.S_IFDIR | 0o700) is None
