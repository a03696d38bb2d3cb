"""cloud-init.yaml and `devpi-agent user-data`: one template, the committed file never drifts
from it, cloud-init's own validator accepts both, the config inside is one the agent accepts."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import REPO_ROOT

from agent.commands import cli
from agent.commands.userdata import (
    DEFAULT_AGENT_URL,
    MAX_USER_DATA_BYTES,
    PLACEHOLDER,
    Account,
    UserData,
    config_toml,
    placeholder_user_data,
    render_user_data,
    written_file,
)
from agent.core.config import ConfigError, parse

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

COMMITTED = REPO_ROOT / "cloud-init.yaml"
SHA = "ab" * 32
VALUE_LINE = re.compile(
    r"^\s*(domain|tls|acme_email|https_port|http_port|name|password|AGENT_URL|AGENT_SHA256)\s*="
)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli.main, ["user-data", *args])


def cloud_init_schema(path: Path) -> subprocess.CompletedProcess[str]:
    """cloud-init's validator. Its exit code counts only without --annotate (22.4 exits 0 with
    it whatever it finds), so --annotate is run for the message only."""
    tool = shutil.which("cloud-init")
    assert tool, "cloud-init is not installed (apt-get install cloud-init): its validator is needed"
    verdict = subprocess.run(
        [tool, "schema", "-c", str(path)], capture_output=True, text=True, timeout=120
    )
    if verdict.returncode == 0:
        assert "Valid cloud-config" in verdict.stdout, verdict.stdout
        return verdict
    annotated = subprocess.run(
        [tool, "schema", "-c", str(path), "--annotate"], capture_output=True, text=True, timeout=120
    )
    return subprocess.CompletedProcess(
        verdict.args, verdict.returncode, annotated.stdout, verdict.stderr
    )


def rendered(**changes: object) -> str:
    values: dict[str, object] = {
        "domain": "pypi.example.org",
        "acme_email": "ops@example.org",
        "users": (Account("devops", "a-long-password-1"),),
        "agent_url": DEFAULT_AGENT_URL,
        "agent_sha256": SHA,
    }
    values.update(changes)
    return render_user_data(UserData(**values))  # type: ignore[arg-type]


def test_committed_file_is_the_template_with_placeholders() -> None:
    assert COMMITTED.read_text() == render_user_data(placeholder_user_data())


def test_make_regenerates_the_committed_file(tmp_path: Path) -> None:
    out = tmp_path / "cloud-init.yaml"
    result = subprocess.run(
        ["make", "-s", f"CLOUD_INIT_YAML={out}", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert out.read_text() == COMMITTED.read_text()


def test_committed_file_passes_cloud_init_schema_and_fits_ec2() -> None:
    text = COMMITTED.read_text()
    assert text.startswith("#cloud-config\n")
    assert len(text.encode()) < MAX_USER_DATA_BYTES
    result = cloud_init_schema(COMMITTED)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cloud_init_schema_is_a_real_check(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(COMMITTED.read_text().replace("runcmd:", "runcmd: 7\nrun_cmd:"))
    assert cloud_init_schema(broken).returncode != 0


def test_placeholders_are_marked_and_refused() -> None:
    text = COMMITTED.read_text()
    config = config_toml(text)
    for key in ("domain", "acme_email", "password"):
        assert re.search(rf'^{key} = "{PLACEHOLDER}', config, re.M), key
    assert f"AGENT_SHA256='{PLACEHOLDER}" in text
    assert f"AGENT_URL={DEFAULT_AGENT_URL}\n" in text
    # Even if the bootstrap's own check were bypassed, the agent refuses the placeholder domain.
    with pytest.raises(ConfigError) as error:
        parse(tomllib.loads(config))
    assert error.value.key == "server.domain"


def test_rendered_user_data_is_the_same_template() -> None:
    """Apart from the values (and the lines only placeholders get), the same lines."""

    def skeleton(text: str) -> list[str]:
        return [
            line
            for line in text.splitlines()
            if not VALUE_LINE.match(line) and not line.lstrip().startswith("#")
        ]

    assert skeleton(rendered()) == skeleton(COMMITTED.read_text())


def test_rendered_config_is_what_the_agent_reads() -> None:
    text = rendered(
        tls="internal",
        domain="10.1.2.3",
        acme_email=None,
        https_port=8443,
        http_port=0,
        users=(Account("devops", 'quote"and\\backslash'), Account("alice", "pässwörd-long")),
    )
    config = parse(tomllib.loads(config_toml(text)))
    assert config.server.domain == "10.1.2.3"
    assert (config.server.https_port, config.server.http_port) == (8443, 0)
    assert config.server.tls == "internal"
    assert [(u.name, u.password) for u in config.users] == [
        ("devops", 'quote"and\\backslash'),
        ("alice", "pässwörd-long"),
    ]
    assert [(i.name, i.bases) for i in config.indexes] == [
        ("devops/pypi", ("root/pypi",)),
        ("alice/pypi", ("root/pypi",)),
    ]


def test_rendered_user_data_passes_cloud_init_schema(tmp_path: Path) -> None:
    path = tmp_path / "user-data"
    path.write_text(rendered())
    result = cloud_init_schema(path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"agent_sha256": "0" * 63}, "is not a sha256"),
        ({"agent_url": "https://x/a b"}, "is not an http(s)://"),
        ({"agent_url": "relative/devpi-agent"}, "is not an http(s)://"),
        ({"users": tuple(Account(f"u{n}", "p" * 60) for n in range(80))}, "over EC2's limit"),
    ],
)
def test_render_refuses(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        rendered(**changes)


def test_render_refuses_a_config_the_agent_would_refuse() -> None:
    with pytest.raises(ConfigError) as error:
        rendered(users=(Account("devops", "short"),))
    assert error.value.key == "users[0].password"


def test_command_generates_passwords_and_says_where_they_are(tmp_path: Path) -> None:
    result = invoke("--domain", "pypi.example.org", "--agent-sha256", SHA.upper())
    assert result.exit_code == 0, result.output
    config = parse(tomllib.loads(config_toml(result.stdout)))
    (user,) = config.users
    assert user.name == "devops"
    assert len(user.password) >= 20
    assert f"generated password for devops: {user.password}" in result.stderr
    assert "/etc/devpi-agent/config.toml" in result.stderr
    assert f"AGENT_SHA256={SHA}\n" in result.stdout
    assert f"AGENT_URL={DEFAULT_AGENT_URL}\n" in result.stdout


def test_command_keeps_given_passwords_quiet() -> None:
    result = invoke(
        "--domain", "pypi.example.org", "--user", "alice:given-password-1", "--agent-sha256", SHA
    )
    assert result.exit_code == 0, result.output
    assert "given-password-1" not in result.stderr
    assert "generated password" not in result.stderr


def test_command_writes_a_private_file_and_takes_the_sha_from_a_file(tmp_path: Path) -> None:
    agent = tmp_path / "devpi-agent"
    agent.write_bytes(b"an agent")
    out = tmp_path / "user-data.yaml"
    result = invoke(
        "--domain", "pypi.example.org", "--agent-file", str(agent), "--agent-url", "/opt/a/agent",
        "-o", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    text = out.read_text()
    assert f"AGENT_SHA256={hashlib.sha256(b'an agent').hexdigest()}\n" in text
    assert "AGENT_URL=/opt/a/agent\n" in text
    assert str(out) in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--agent-sha256", SHA], "--domain is required"),
        (["--domain", "x.example.org"], "--agent-sha256"),
        (["--domain", "x.example.org", "--agent-sha256", "nope"], "is not a sha256"),
        (
            ["--domain", "x.example.org", "--agent-sha256", SHA, "--user", "a:pw-long-enough",
             "--generate-passwords"],
            "exclude each other",
        ),
        (
            ["--domain", "x.example.org", "--agent-sha256", SHA, "--user", "a:short"],
            "users[0].password",
        ),
        (["--domain", "1.2.3.4", "--agent-sha256", SHA], "tls"),
    ],
)  # fmt: skip
def test_command_refuses(args: list[str], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PEX", raising=False)
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "#cloud-config" not in result.stdout


def test_command_takes_the_running_agent_and_pins_its_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pex = tmp_path / "devpi-agent"
    pex.write_bytes(b"an agent")
    monkeypatch.setenv("PEX", str(pex))
    result = invoke("--domain", "pypi.example.org")
    assert result.exit_code == 0, result.output
    assert re.search(r"^ +AGENT_URL=https://github.com/.*/releases/download/v[0-9.]+/devpi-agent$",
                     result.stdout, re.M)  # fmt: skip
    assert f"AGENT_SHA256={hashlib.sha256(b'an agent').hexdigest()}\n" in result.stdout


def test_bootstrap_script_is_valid_bash(tmp_path: Path) -> None:
    script = tmp_path / "devpi-agent-bootstrap"
    script.write_text(written_file(rendered(), "/usr/local/sbin/devpi-agent-bootstrap"))
    assert script.read_text().startswith("#!/bin/bash\n")
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"AGENT_SHA256={SHA}\n" in script.read_text()


def test_output_replaces_a_symlink_and_leaves_its_target_alone(tmp_path: Path) -> None:
    """The attack: a link planted at the -o path makes the agent write passwords through it."""
    target = tmp_path / "elsewhere.txt"
    target.write_text("not yours\n")
    target.chmod(0o644)
    out = tmp_path / "user-data.yaml"
    out.symlink_to(target)
    result = invoke("--domain", "pypi.example.org", "--agent-sha256", SHA, "-o", str(out))
    assert result.exit_code == 0, result.output
    assert target.read_text() == "not yours\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert not out.is_symlink() and "AGENT_SHA256=" in out.read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_output_never_holds_the_content_at_the_old_mode(tmp_path: Path) -> None:
    """An existing 0644 file: the content goes to a new 0600 inode renamed into place, so no
    reader of the old inode (an open handle, a hard link) ever sees a byte of it."""
    out = tmp_path / "user-data.yaml"
    out.write_text("old\n")
    out.chmod(0o644)
    old_inode = tmp_path / "hard-link-to-the-old-inode"
    os.link(out, old_inode)
    result = invoke("--domain", "pypi.example.org", "--agent-sha256", SHA, "-o", str(out))
    assert result.exit_code == 0, result.output
    assert old_inode.read_text() == "old\n"
    assert out.stat().st_ino != old_inode.stat().st_ino
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and "AGENT_SHA256=" in out.read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
