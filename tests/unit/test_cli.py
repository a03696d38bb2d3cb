"""The command line, through click's CliRunner. Nothing here may converge the real host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from conftest import REFERENCE_TOML

from agent import __version__
from agent.commands import cli
from agent.commands import converge as converge_cli


@pytest.fixture(autouse=True)
def never_converge(monkeypatch: pytest.MonkeyPatch) -> None:
    """A safety net: these tests run as root on a real host; apply/plan must never get going."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        pytest.fail("the CLI tried to converge this host")

    monkeypatch.setattr(converge_cli, "_converge", refuse)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli.main, list(args))


def write_config(tmp_path: Path, text: str, name: str = "bad.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_version() -> None:
    result = invoke("version")
    assert result.exit_code == 0
    assert result.output == f"devpi-agent {__version__}\n"
    assert __version__ == "0.1.0"
    assert result.output == "devpi-agent 0.1.0\n"


def test_help_lists_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("apply", "plan", "version"):
        assert command in result.output


@pytest.mark.parametrize("command", ["apply", "plan"])
def test_missing_config(tmp_path: Path, command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(command, "--config", "missing.toml")
    assert result.exit_code == 2
    assert "invalid config" in result.stderr
    assert "missing.toml" in result.stderr
    assert "does not exist" in result.stderr
    assert "nothing was changed on this host" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("command", ["apply", "plan"])
@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("bogus = 1\n" + REFERENCE_TOML, "bogus"),
        (REFERENCE_TOML + "bogus = 1\n", "indexes[0].bogus"),
        (REFERENCE_TOML.replace("[devpi]\n", "[devpi]\nflavour = 2\n"), "devpi.flavour"),
        (REFERENCE_TOML.replace("https_port = 443", "https_port = 70000"), "server.https_port"),
        (REFERENCE_TOML.replace('name = "devops"', 'name = "root"'), "users[0].name"),
    ],
)
def test_invalid_config_exits_2_and_names_the_key(
    tmp_path: Path, command: str, text: str, key: str
) -> None:
    path = write_config(tmp_path, text)
    result = invoke(command, "--config", str(path))
    assert result.exit_code == 2
    assert f"devpi-agent: invalid config: {key}: " in result.stderr


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[server\n")
    result = invoke("plan", "--config", str(path))
    assert result.exit_code == 2
    assert str(path) in result.stderr
    assert "not valid TOML" in result.stderr


def test_config_directory_is_a_usage_error(tmp_path: Path) -> None:
    result = invoke("apply", "--config", str(tmp_path))
    assert result.exit_code == 2
    assert "invalid config" not in result.output


def test_unknown_command() -> None:
    assert invoke("destroy").exit_code == 2
