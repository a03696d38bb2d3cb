"""Config values that try to inject into the files the agent writes (issue #12, item 5).

Each attack is the config a hostile or careless author would write; the test renders every file
that value reaches and fails if the injected directive or command is there. A fixed agent
refuses the config instead (ConfigError naming the key, exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import formats
import pytest
from conftest import FakeRunner, make_ctx, reference_data

from agent.config import Config, ConfigError, load, parse
from agent.files import render
from agent.steps import backup, caddy, devpi_config, supervisor

SECRET = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEF"


def rendered_files(tmp_path: Path, config: Config) -> dict[str, str]:
    """Every file a config's values reach, rendered as apply would write them."""
    ctx = make_ctx(tmp_path, config, FakeRunner())
    variables = backup._variables(ctx)
    return {
        "Caddyfile": caddy.content(ctx, (2, 6, 2), None),
        "devpi-server.yml": devpi_config.content(ctx),
        "supervisor-devpi-server.conf": supervisor.program_content(ctx),
        "devpi-agent-backup.service": render("devpi-agent-backup.service.j2", **variables),
        "devpi-agent-backup.timer": render("devpi-agent-backup.timer.j2", **variables),
        "devpi-agent-backup.cron": render(
            "devpi-agent-backup.cron.j2",
            cron_schedule="0 0 * * *",
            log_file=backup.CRON_LOG,
            **variables,
        ),
    }


def refused_or_rendered(tmp_path: Path, data: dict[str, Any], key: str) -> dict[str, str] | None:
    """None when parse() refuses the config naming `key`; else the rendered files."""
    try:
        config = parse(data)
    except ConfigError as error:
        assert error.key == key, error
        return None
    return rendered_files(tmp_path, config)


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def test_domain_zone_id_cannot_add_a_caddy_site_without_basic_auth(tmp_path: Path) -> None:
    data = reference_data()
    data["server"] = {
        "domain": "fe80::1%x]:443 {\nreverse_proxy 127.0.0.1:4040\n}",
        "tls": "internal",
    }
    files = refused_or_rendered(tmp_path, data, "server.domain")
    if files is not None:
        # The legitimate proxy line opens a block; a bare one is a site of the attacker's.
        assert "reverse_proxy 127.0.0.1:4040" not in lines(files["Caddyfile"]), files["Caddyfile"]
        assert "reverse_proxy 127.0.0.1:4040" not in lines(files["devpi-server.yml"])


def test_backup_dir_cannot_add_a_command_to_the_systemd_unit(tmp_path: Path) -> None:
    data = reference_data()
    data["backup"] = {
        "dir": "/var/backups/devpi\n[Service]\nExecStartPre=/bin/sh -c 'touch /tmp/pwned'"
    }
    files = refused_or_rendered(tmp_path, data, "backup.dir")
    if files is not None:
        service = files["devpi-agent-backup.service"]
        assert not any(line.startswith("ExecStartPre=") for line in lines(service)), service


def test_acme_email_cannot_read_caddys_environment(tmp_path: Path) -> None:
    data = reference_data()
    data["server"]["acme_email"] = "{$AWS_SECRET_ACCESS_KEY}@example.com"
    files = refused_or_rendered(tmp_path, data, "server.acme_email")
    if files is not None:
        # Caddy replaces {$VAR} from its environment wherever it appears in the Caddyfile.
        assert "{$" not in files["Caddyfile"], files["Caddyfile"]


def test_replica_address_zone_id_cannot_widen_the_replication_site(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    data = reference_data()
    data["server"] = {"domain": "pypi.example.com", "tls": "internal", "http_port": 0}
    data["devpi"] = {
        "role": "primary",
        "replication_port": 8444,
        "replica_addresses": ["10.0.0.5", "::%x 0.0.0.0/0"],
        "secret_file": str(secret),
    }
    files = refused_or_rendered(tmp_path, data, "devpi.replica_addresses[1]")
    if files is not None:
        remote_ip = next(
            line for line in lines(files["Caddyfile"]) if line.startswith("@replicas remote_ip")
        )
        # 0.0.0.0/0 admits every IPv4 client to devpi's replication protocol.
        assert "0.0.0.0/0" not in remote_ip.split(), remote_ip


@pytest.mark.parametrize("directory", ["my configs", "x\nExecStartPre=touch pwned", "50%off"])
def test_config_path_cannot_split_the_backup_command(tmp_path: Path, directory: str) -> None:
    path = tmp_path / directory / "config.toml"
    path.parent.mkdir()
    path.write_text(
        '[server]\ndomain = "pypi.example.com"\nacme_email = "ops@example.com"\n'
        '[[users]]\nname = "devops"\npassword = "change-me"\n'
    )
    try:
        config = load(path)
    except ConfigError as error:
        assert error.key == "--config", error
        return
    files = rendered_files(tmp_path, config)
    unit = formats.systemd_unit(files["devpi-agent-backup.service"])
    argv = formats.systemd_exec(formats.systemd_value(unit, "Service", "ExecStart"))
    # As systemd and cron/sh split the command: the path stays one argument, unchanged.
    assert argv[1:] == ["backup", "--config", str(path)], argv
    cron_line = files["devpi-agent-backup.cron"].splitlines()[-1]
    argv = formats.cron_command(cron_line, str(backup.CRON_LOG))
    assert argv[2:] == ["backup", "--config", str(path)], argv
