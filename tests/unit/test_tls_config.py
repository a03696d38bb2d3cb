"""Config validation of the TLS settings (issue #8): every error names its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import reference_data

from agent.core.config import ConfigError, parse


def server(**settings: Any) -> dict[str, Any]:
    data = reference_data()
    data["server"].update(settings)
    return data


FILES = {"tls": "files", "cert_file": "/etc/ssl/pypi.pem", "key_file": "/etc/ssl/private/pypi.key"}
PEBBLE = "https://127.0.0.1:14000/dir"


def test_defaults_are_acme_with_preflight() -> None:
    config = parse(reference_data()).server
    assert config.tls == "acme"
    assert config.acme_ca is None and config.acme_ca_root is None
    assert config.acme_preflight is True
    assert config.cert_file is None and config.key_file is None


def test_files_mode_parses() -> None:
    config = parse(server(**FILES)).server
    assert config.tls == "files"
    assert config.cert_file == Path("/etc/ssl/pypi.pem")
    assert config.key_file == Path("/etc/ssl/private/pypi.key")


def test_files_mode_accepts_an_ip_domain() -> None:
    assert parse(server(domain="192.0.2.10", **FILES)).server.domain == "192.0.2.10"


def test_company_acme_ca_parses() -> None:
    config = parse(
        server(acme_ca=PEBBLE, acme_ca_root="/etc/devpi-agent/ca.pem", acme_preflight=False)
    ).server
    assert config.acme_ca == PEBBLE
    assert config.acme_ca_root == Path("/etc/devpi-agent/ca.pem")
    assert config.acme_preflight is False


@pytest.mark.parametrize(
    ("settings", "key", "message"),
    [
        ({"tls": "selfsigned"}, "server.tls", '"files"'),
        ({"tls": "files", "key_file": "/k.pem"}, "server.cert_file", "required"),
        ({"tls": "files", "cert_file": "/c.pem"}, "server.key_file", "required"),
        ({**FILES, "cert_file": "c.pem"}, "server.cert_file", "not an absolute path"),
        ({**FILES, "key_file": "./k.pem"}, "server.key_file", "not an absolute path"),
        ({**FILES, "cert_file": 1}, "server.cert_file", "expected a string"),
        ({**FILES, "key_file": "/k\0.pem"}, "server.key_file", "holds a character"),
        ({"cert_file": "/c.pem"}, "server.cert_file", 'only used with tls = "files"'),
        ({"tls": "internal", "key_file": "/k.pem"}, "server.key_file", "only used with"),
        ({"acme_ca": "http://ca.example.com/dir"}, "server.acme_ca", "https://"),
        ({"acme_ca": "ca.example.com/dir"}, "server.acme_ca", "https://"),
        ({"acme_ca": "https://"}, "server.acme_ca", "https://"),
        ({"acme_ca": "https://ca.example.com:99999/dir"}, "server.acme_ca", "https://"),
        ({"acme_ca": "https://[::1/dir"}, "server.acme_ca", "https://"),
        ({"acme_ca": "https://ca.example.com/d ir"}, "server.acme_ca", "https://"),
        ({"acme_ca": "https://ca.example.com/{x}"}, "server.acme_ca", "https://"),
        ({"acme_ca": ["https://ca.example.com/dir"]}, "server.acme_ca", "expected a string"),
        ({"tls": "internal", "acme_ca": PEBBLE}, "server.acme_ca", 'only used with tls = "acme"'),
        ({**FILES, "acme_ca": PEBBLE}, "server.acme_ca", "only used with"),
        ({"acme_ca_root": "/ca.pem"}, "server.acme_ca_root", "needs server.acme_ca"),
        ({"acme_ca": PEBBLE, "acme_ca_root": "ca.pem"}, "server.acme_ca_root", "absolute"),
        ({"tls": "internal", "acme_ca_root": "/ca.pem"}, "server.acme_ca_root", "only used"),
        ({"acme_preflight": "no"}, "server.acme_preflight", "expected a boolean"),
        ({"acme_preflight": 0}, "server.acme_preflight", "expected a boolean"),
        ({"tls": "internal", "acme_preflight": False}, "server.acme_preflight", "only used"),
    ],
)
def test_tls_setting_errors_name_the_key(settings: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse(server(**settings))
    assert raised.value.key == key, raised.value
    assert message in raised.value.message
