"""Off-host backups (#17): [backup] remote_* validation, restic's argv and environment (never a
secret in argv), its errors in a person's words, the remote-backup record and verify's verdict."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeRunner, make_ctx, reference_data, result

from agent.commands import backup as backup_command
from agent.commands import verify
from agent.core.config import ConfigError, parse
from agent.core.log import redactor
from agent.core.status import read_status
from agent.host import restic
from agent.steps import backup as backup_step

REPO_PASSWORD = "repo-password-never-in-argv"
AWS_SECRET = "aws-secret-never-in-argv-or-logs"


def secret_file(tmp_path: Path, name: str, content: str, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(content)
    path.chmod(mode)
    return path


def with_remote(tmp_path: Path, **backup: Any) -> dict[str, Any]:
    data = reference_data()
    data["backup"] = {
        "remote": "sftp:backup@192.0.2.7:/srv/restic",
        "remote_password_file": str(secret_file(tmp_path, "restic.pass", REPO_PASSWORD + "\n")),
        **backup,
    }
    return data


def refused(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(data)
    return info.value


# --- config -----------------------------------------------------------------------------------


def test_no_remote_by_default_and_defaults_once() -> None:
    config = parse(reference_data())
    assert config.backup.remote is None and config.backup.remote_keep == 14


def test_an_sftp_remote_with_key_and_known_hosts(tmp_path: Path) -> None:
    key = secret_file(tmp_path, "id_ed25519", "KEY")
    known = secret_file(tmp_path, "known_hosts", "host ssh-ed25519 AAAA", mode=0o644)
    config = parse(
        with_remote(
            tmp_path,
            remote_keep=3,
            remote_ssh_key_file=str(key),
            remote_known_hosts_file=str(known),
        )
    )
    assert config.backup.remote_keep == 3
    assert config.backup.remote_ssh_key_file == key


def test_an_env_file_for_s3_is_read_and_its_values_are_secrets(tmp_path: Path) -> None:
    env = secret_file(
        tmp_path,
        "restic.env",
        f'# AWS keys\nAWS_ACCESS_KEY_ID=AKIAEXAMPLE\nexport AWS_SECRET_ACCESS_KEY="{AWS_SECRET}"\n',
    )
    config = parse(
        with_remote(tmp_path, remote="s3:s3.amazonaws.com/bucket/devpi", remote_env_file=str(env))
    )
    assert dict(config.backup.remote_env) == {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
    }
    assert AWS_SECRET in config.secrets()
    assert AWS_SECRET not in repr(config)


@pytest.mark.parametrize(
    ("backup", "key", "words"),
    [
        ({"remote": "ftp://host/x"}, "backup.remote", "is not a restic repository"),
        ({"remote": "sftp:host"}, "backup.remote", "is not sftp:"),
        ({"remote": "sftp:-oProxyCommand=x:/p"}, "backup.remote", "is not sftp:"),
        ({"remote": "rest:https://u:pw@host/"}, "backup.remote", "must not hold a password"),
        ({"remote_keep": 0}, "backup.remote_keep", "at least 1"),
        ({"remote_password_file": None}, "backup.remote_password_file", "required"),
        (
            {"remote_password_file": "/nonexistent/restic.pass"},
            "backup.remote_password_file",
            "does not",
        ),
        (
            {"remote": "s3:s3.amazonaws.com/b", "remote_ssh_key_file": "/k"},
            "backup.remote_ssh_key_file",
            "only used with an sftp: remote",
        ),
    ],
)
def test_bad_remote_settings_name_the_key(
    tmp_path: Path, backup: dict[str, Any], key: str, words: str
) -> None:
    data = with_remote(tmp_path)
    data["backup"].update(backup)
    data["backup"] = {k: v for k, v in data["backup"].items() if v is not None}
    error = refused(data)
    assert error.key == key and words in str(error)


def test_a_password_file_others_can_read_is_refused(tmp_path: Path) -> None:
    data = with_remote(tmp_path)
    Path(data["backup"]["remote_password_file"]).chmod(0o640)
    error = refused(data)
    assert error.key == "backup.remote_password_file" and "chmod 600" in str(error)


def test_remote_settings_without_a_remote_are_refused(tmp_path: Path) -> None:
    data = reference_data()
    data["backup"] = {"remote_password_file": str(secret_file(tmp_path, "p", "x"))}
    assert refused(data).key == "backup.remote_password_file"


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("AWS_KEY\n", "line 1 is not NAME=VALUE"),
        ("RESTIC_PASSWORD=x\n", "set by the agent"),
        ("RESTIC_REPOSITORY=/elsewhere\n", "set by the agent"),
    ],
)
def test_bad_env_files_are_refused(tmp_path: Path, content: str, words: str) -> None:
    env = secret_file(tmp_path, "restic.env", content)
    error = refused(with_remote(tmp_path, remote_env_file=str(env)))
    assert error.key == "backup.remote_env_file" and words in str(error)


def test_an_env_file_others_can_read_is_refused(tmp_path: Path) -> None:
    env = secret_file(tmp_path, "restic.env", "AWS_ACCESS_KEY_ID=x\n", mode=0o644)
    assert "chmod 600" in str(refused(with_remote(tmp_path, remote_env_file=str(env))))


# --- restic: argv, environment, errors --------------------------------------------------------

SUMMARY = json.dumps(
    {
        "message_type": "summary",
        "data_added": 1234,
        "total_bytes_processed": 5678,
        "total_duration": 1.5,
        "snapshot_id": "abcdef12",
    }
)


def s3_config(tmp_path: Path) -> Any:
    env = secret_file(tmp_path, "restic.env", f"AWS_SECRET_ACCESS_KEY={AWS_SECRET}\n")
    return parse(
        with_remote(tmp_path, remote="s3:s3.amazonaws.com/bucket/devpi", remote_env_file=str(env))
    )


def test_push_keeps_secrets_out_of_argv(tmp_path: Path) -> None:
    runner = FakeRunner().on(["restic", "backup"], stdout=SUMMARY + "\n")
    ctx = make_ctx(tmp_path / "root", s3_config(tmp_path), runner)
    pushed = restic.push(ctx, Path("/var/backups/devpi/2026"), "2026")
    assert pushed == restic.Pushed("abcdef12", 1234, 5678, 1.5)
    programs = [call.argv[1] for call in runner.calls]
    assert programs == ["cat", "unlock", "backup", "forget"]
    for call in runner.calls:
        argv = " ".join(call.argv)
        assert REPO_PASSWORD not in argv and AWS_SECRET not in argv and "s3:" not in argv
        assert call.env is not None and call.env["AWS_SECRET_ACCESS_KEY"] == AWS_SECRET
        assert call.env["RESTIC_REPOSITORY"] == "s3:s3.amazonaws.com/bucket/devpi"
        assert call.env["RESTIC_PASSWORD_FILE"].endswith("restic.pass")
    forget = runner.calls[3].argv
    assert forget[forget.index("--keep-last") + 1] == "14" and "--prune" in forget


def test_a_new_repository_is_initialised_once(tmp_path: Path) -> None:
    missing = (
        "Fatal: unable to open config file: Stat: no such file\n"
        "Is there a repository at the following location?"
    )
    runner = (
        FakeRunner()
        .on(["restic", "cat"], rc=1, stderr=missing, times=1)
        .on(["restic", "backup"], stdout=SUMMARY)
    )
    ctx = make_ctx(tmp_path / "root", s3_config(tmp_path), runner)
    assert restic.ensure_repository(ctx) is True
    assert restic.ensure_repository(ctx) is False
    assert len(runner.ran(["restic", "init"])) == 1


def test_sftp_uses_the_key_and_known_hosts_and_never_prompts(tmp_path: Path) -> None:
    key = secret_file(tmp_path, "id", "KEY")
    known = secret_file(tmp_path, "known", "x")
    config = parse(
        with_remote(
            tmp_path,
            remote="sftp://backup@192.0.2.7:2222//srv/restic",
            remote_ssh_key_file=str(key),
            remote_known_hosts_file=str(known),
        )
    )
    opts = restic.options(config.backup)
    assert opts[0] == "-o" and opts[1].startswith("sftp.command=ssh ")
    command = opts[1]
    for part in ("BatchMode=yes", f"-i {key}", f"UserKnownHostsFile={known}", "-p 2222"):
        assert part in command
    assert command.endswith("backup@192.0.2.7 -s sftp")


@pytest.mark.parametrize(
    ("stderr", "rc", "words"),
    [
        ("Fatal: wrong password or no key found", 1, "wrong repository password"),
        (
            "subprocess ssh: ssh: connect to host 192.0.2.7 port 22: Connection refused\n"
            "Fatal: unable to open repository at sftp:x: unable to start the sftp session",
            1,
            "cannot be reached",
        ),
        ("Save(<data/1>) returned error: write /srv/x: no space left on device", 1, "is full"),
        ('Save(<data/1>) returned error: sftp: "Failure" (SSH_FX_FAILURE)', 1, "disk is full"),
        ("", -9, "timed out"),
    ],
)
def test_errors_name_the_problem(stderr: str, rc: int, words: str) -> None:
    message = restic.explain(result(["restic"], rc, "", stderr), "uploading the backup")
    assert message.startswith("remote backup: uploading the backup failed: ")
    assert words in message


def test_pick_latest_an_id_or_a_backup_name() -> None:
    found = [
        restic.Snapshot("aaaa1111", "aaaa1111", "t1", ("/b/1",), ("devpi-agent", "20260101")),
        restic.Snapshot("bbbb2222", "bbbb2222", "t2", ("/b/2",), ("devpi-agent", "20260102")),
    ]
    assert restic.pick(found, "latest").id == "bbbb2222"
    assert restic.pick(found, "aaaa").id == "aaaa1111"
    assert restic.pick(found, "20260102").id == "bbbb2222"
    with pytest.raises(restic.RemoteFailed, match="matches no snapshot"):
        restic.pick(found, "cccc")
    with pytest.raises(restic.RemoteFailed, match="holds no snapshot"):
        restic.pick([], "latest")


# --- the backup command's record --------------------------------------------------------------


def local_backup(tmp_path: Path) -> backup_command.BackupResult:
    return backup_command.BackupResult(Path("/var/backups/devpi/20260101T000000Z"), 3, 300, 0.5)


def test_a_good_push_is_recorded(tmp_path: Path) -> None:
    runner = FakeRunner().on(["restic", "backup"], stdout=SUMMARY)
    ctx = make_ctx(tmp_path / "root", s3_config(tmp_path), runner)
    record = backup_command.push_remote(ctx, local_backup(tmp_path))
    assert read_status(ctx.files, "remote-backup") == record
    assert record["ok"] is True and record["snapshot"] == "abcdef12"
    assert record["bytes"] == 5678 and isinstance(record["seconds"], float)


def test_a_failed_push_is_recorded_and_names_the_kept_local_backup(tmp_path: Path) -> None:
    runner = FakeRunner().on(
        ["restic", "cat"], rc=1, stderr="Fatal: wrong password or no key found"
    )
    ctx = make_ctx(tmp_path / "root", s3_config(tmp_path), runner)
    backup = local_backup(tmp_path)
    record = backup_command.push_remote(ctx, backup)
    assert read_status(ctx.files, "remote-backup") == record
    assert record["ok"] is False and "wrong repository password" in str(record["error"])
    assert f"the local backup {backup.path} is kept" in str(record["error"])
    assert REPO_PASSWORD not in json.dumps(record)


def test_env_values_are_redacted_once_loaded(tmp_path: Path) -> None:
    config = s3_config(tmp_path)
    redactor.add_all(value for _, value in config.backup.remote_env)
    assert AWS_SECRET not in redactor(f"AWS_SECRET_ACCESS_KEY={AWS_SECRET}")


# --- verify -----------------------------------------------------------------------------------


def test_verify_allows_the_schedule_and_a_margin(tmp_path: Path) -> None:
    config = s3_config(tmp_path)
    ctx = make_ctx(tmp_path / "root", config, FakeRunner())
    assert verify.schedule_interval(ctx) == 86400
    assert verify.allowed_age(86400) == 86400 * 1.25
    assert verify.allowed_age(3600) == 7200
    hourly = replace(config, backup=replace(config.backup, schedule="04:30"))
    assert verify.schedule_interval(make_ctx(tmp_path / "root", hourly, FakeRunner())) == 86400


def test_verify_asks_systemd_for_other_calendars(tmp_path: Path) -> None:
    config = s3_config(tmp_path)
    weekly = replace(config, backup=replace(config.backup, schedule="Mon *-*-* 03:00"))
    runner = FakeRunner().on(
        ["systemd-analyze"],
        stdout="    Next elapse: Mon 2026-12-07 03:00:00 UTC\n"
        "       Iter. #2: Mon 2026-12-14 03:00:00 UTC\n",
    )
    assert verify.schedule_interval(make_ctx(tmp_path / "root", weekly, runner)) == 7 * 86400


def test_verify_remote_verdicts() -> None:
    now, allowed = 1_000_000.0, 3600.0
    good = {"ok": True, "finished": now - 60, "snapshot": "abcdef12"}
    assert verify.remote_backup_verdict(good, now, allowed, "s3:x").ok
    old = {**good, "finished": now - 7200}
    check = verify.remote_backup_verdict(old, now, allowed, "s3:x")
    assert not check.ok and check.detail.startswith("too old")
    bad = {"ok": False, "finished": now - 60, "error": "remote backup: ... is full\nmore"}
    check = verify.remote_backup_verdict(bad, now, allowed, "s3:x")
    assert not check.ok and "failed" in check.detail and "is full" in check.detail
    assert not verify.remote_backup_verdict(None, now, allowed, "s3:x").ok


def test_verify_has_the_check_only_with_a_remote(tmp_path: Path) -> None:
    names = [name for name, _ in verify.checks_for(parse(reference_data()))]
    assert "remote-backup" not in names
    config = s3_config(tmp_path)
    assert "remote-backup" in [name for name, _ in verify.checks_for(config)]
    unscheduled = replace(config, backup=replace(config.backup, enabled=False))
    assert "remote-backup" not in [name for name, _ in verify.checks_for(unscheduled)]


# --- the backup step installs restic ----------------------------------------------------------


def test_the_backup_step_installs_restic_once_and_plan_does_not(tmp_path: Path) -> None:
    config = parse(with_remote(tmp_path))
    installed = "restic\tii \t0.14.0\nopenssh-client\tii \t9.2\n"
    for check, dpkg, installs in ((True, "", 0), (False, "", 1), (False, installed, 0)):
        runner = FakeRunner().on(["dpkg-query"], stdout=dpkg)
        ctx = make_ctx(tmp_path / f"root-{check}-{installs}", config, runner, check=check)
        backup_step.converge(ctx)
        apt = [c for c in runner.calls if c.program == "apt-get" and "install" in c.argv]
        assert len(apt) == installs, (check, dpkg, runner.calls)
        if installs:
            assert {"restic", "openssh-client"} <= set(apt[0].argv)
