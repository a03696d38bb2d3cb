"""Rendered files against golden copies, and the small parsers that read host facts.

UPDATE_GOLDEN=1 pytest tests/unit/test_templates.py rewrites tests/unit/golden/.
"""

from __future__ import annotations

import base64
import random
import textwrap
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from conftest import FakeRunner, assert_golden, make_ctx, reference_data

from agent.core.config import Config, parse
from agent.core.context import Context
from agent.facts.system import OsRelease, parse_caddy_version, parse_os_release
from agent.steps import caddy, devpi_config, supervisor
from agent.steps.apt import dearmor

# bcrypt hashes (cost 4, so checking them is cheap) of the passwords in the configs below.
DEVOPS_PASSWORD = "change-me"
DEVOPS_HASH = "$2b$04$vnLW09wuDFphFKEaULf.7eKN72dlq6Rrc2udYRrpKu7X1Q0HW5Qja"
CI_PASSWORD = "ci-secret-2"
CI_HASH = "$2b$04$h7DfMYBfj6WCSPSkzp1BtOzce.UT96Laajd8plr/b.RKrvmvZeZle"

# A Caddyfile as a previous run left it: only the hash lines matter to content().
CURRENT = f"\tbasicauth {{\n\t\tdevops {DEVOPS_HASH}\n\t\tci {CI_HASH}\n\t}}\n"


def acme_config() -> Config:
    data = reference_data()
    data["users"].append({"name": "ci", "password": CI_PASSWORD})
    return parse(data)


def internal_config() -> Config:
    data: dict[str, Any] = reference_data()
    data["server"] = {
        "domain": "pypi.internal.example",
        "https_port": 8443,
        "http_port": 0,
        "tls": "internal",
        "caddy_admin": "127.0.0.1:2019",
    }
    data["devpi"] = {
        "port": 3141,
        "indexer": "whoosh",
        "home": "/srv/devpi",
        "user": "pypi",
        "key_derivation": "devpi",
    }
    data["users"].append({"name": "ci", "password": CI_PASSWORD})
    return parse(data)


CONFIGS = {"acme": acme_config, "internal-http0": internal_config}
VERSIONS = {"2.6.2": (2, 6, 2), "2.8.4": (2, 8, 4), "2.10.0": (2, 10, 0)}


def ctx_for(tmp_path: Path, config: Config) -> Context:
    return make_ctx(tmp_path, config, FakeRunner())


# --- Caddyfile --------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", sorted(CONFIGS))
@pytest.mark.parametrize("version", list(VERSIONS))
def test_caddyfile_golden(tmp_path: Path, version: str, tls: str) -> None:
    ctx = ctx_for(tmp_path, CONFIGS[tls]())
    rendered = caddy.content(ctx, VERSIONS[version], CURRENT)
    assert_golden(f"Caddyfile-{version}-{tls}", rendered)


@pytest.mark.parametrize(
    ("version", "directive"),
    [("2.6.2", "basicauth"), ("2.8.4", "basic_auth"), ("2.10.0", "basic_auth")],
)
def test_caddyfile_uses_the_directive_of_the_version(
    tmp_path: Path, version: str, directive: str
) -> None:
    rendered = caddy.content(ctx_for(tmp_path, acme_config()), VERSIONS[version], CURRENT)
    assert f"\t{directive} {{\n" in rendered
    other = "basic_auth" if directive == "basicauth" else "basicauth"
    assert other not in rendered


def test_caddyfile_acme_has_email_and_redirect_port(tmp_path: Path) -> None:
    rendered = caddy.content(ctx_for(tmp_path, acme_config()), (2, 6, 2), CURRENT)
    assert "\temail ops@example.com\n" in rendered
    assert "\thttp_port 80\n" in rendered
    assert "tls internal" not in rendered
    assert "pypi.example.com:443 {" in rendered
    assert "header_up X-Outside-Url https://pypi.example.com\n" in rendered


def test_caddyfile_internal_http0(tmp_path: Path) -> None:
    rendered = caddy.content(ctx_for(tmp_path, internal_config()), (2, 6, 2), CURRENT)
    assert "auto_https disable_redirects" in rendered
    assert "http_port" not in rendered
    assert "\ttls internal\n" in rendered
    assert "skip_install_trust" in rendered
    assert "email" not in rendered
    assert "reverse_proxy 127.0.0.1:3141 {" in rendered
    assert "header_up X-Outside-Url https://pypi.internal.example:8443\n" in rendered


def test_caddyfile_blocks_changelog(tmp_path: Path) -> None:
    rendered = caddy.content(ctx_for(tmp_path, acme_config()), (2, 10, 0), CURRENT)
    assert "@changelog path /+changelog /+changelog/*" in rendered
    assert 'respond @changelog "Forbidden" 403' in rendered


def test_caddyfile_ipv6_site_is_bracketed(tmp_path: Path) -> None:
    data = reference_data()
    data["server"].update(domain="2001:db8::1", tls="internal")
    del data["server"]["acme_email"]
    rendered = caddy.content(ctx_for(tmp_path, parse(data)), (2, 10, 0), CURRENT)
    assert "[2001:db8::1]:443 {" in rendered


@pytest.mark.parametrize("version", list(VERSIONS))
def test_caddyfile_keeps_matching_hashes_no_churn(tmp_path: Path, version: str) -> None:
    ctx = ctx_for(tmp_path, acme_config())
    first = caddy.content(ctx, VERSIONS[version], CURRENT)
    assert caddy.existing_hashes(first) == {"devops": DEVOPS_HASH, "ci": CI_HASH}
    second = caddy.content(ctx, VERSIONS[version], first)
    assert second == first


def test_caddyfile_new_password_gets_a_new_hash(tmp_path: Path) -> None:
    data = reference_data()
    data["users"][0]["password"] = "a-new-password"
    data["users"].append({"name": "ci", "password": CI_PASSWORD})
    rendered = caddy.content(ctx_for(tmp_path, parse(data)), (2, 6, 2), CURRENT)
    hashes = caddy.existing_hashes(rendered)
    assert hashes["ci"] == CI_HASH
    assert hashes["devops"] != DEVOPS_HASH
    assert hashes["devops"].startswith(f"$2b${caddy.BCRYPT_ROUNDS:02d}$")
    assert bcrypt.checkpw(b"a-new-password", hashes["devops"].encode())
    assert not bcrypt.checkpw(DEVOPS_PASSWORD.encode(), hashes["devops"].encode())


def test_caddyfile_first_render_hashes_every_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(caddy, "BCRYPT_ROUNDS", 4)
    rendered = caddy.content(ctx_for(tmp_path, acme_config()), (2, 6, 2), None)
    hashes = caddy.existing_hashes(rendered)
    assert set(hashes) == {"devops", "ci"}
    assert bcrypt.checkpw(DEVOPS_PASSWORD.encode(), hashes["devops"].encode())
    assert bcrypt.checkpw(CI_PASSWORD.encode(), hashes["ci"].encode())
    assert DEVOPS_PASSWORD not in rendered
    assert CI_PASSWORD not in rendered
    # ...and from then on, the file is stable.
    assert caddy.content(ctx_for(tmp_path, acme_config()), (2, 6, 2), rendered) == rendered


def test_caddyfile_drops_users_no_longer_configured(tmp_path: Path) -> None:
    rendered = caddy.content(ctx_for(tmp_path, parse(reference_data())), (2, 6, 2), CURRENT)
    assert caddy.existing_hashes(rendered) == {"devops": DEVOPS_HASH}


# --- devpi-server.yml and the supervisor program ----------------------------------------------


def test_devpi_server_yml_golden_reference(tmp_path: Path) -> None:
    assert_golden(
        "devpi-server.yml-reference", devpi_config.content(ctx_for(tmp_path, acme_config()))
    )


def test_devpi_server_yml_golden_custom(tmp_path: Path) -> None:
    assert_golden(
        "devpi-server.yml-custom", devpi_config.content(ctx_for(tmp_path, internal_config()))
    )


def test_devpi_server_yml_values(tmp_path: Path) -> None:
    text = devpi_config.content(ctx_for(tmp_path, internal_config()))
    assert "  serverdir: /srv/devpi/server\n" in text
    assert "  secretfile: /srv/devpi/secret\n" in text
    assert "  host: 127.0.0.1\n" in text
    assert "  port: 3141\n" in text
    assert "  outside-url: https://pypi.internal.example:8443\n" in text
    assert "  restrict-modify: root\n" in text
    assert "  indexer-backend: whoosh\n" in text
    # key_derivation = "devpi": devpi-server's own argon2 cost, so no option is written.
    assert "argon2-" not in text


def test_devpi_server_yml_argon2_cost_by_default(tmp_path: Path) -> None:
    text = devpi_config.content(ctx_for(tmp_path, acme_config()))
    assert "  argon2-memory-cost: 65536\n" in text
    assert "  argon2-time-cost: 3\n" in text
    assert "  argon2-parallelism: 4\n" in text


def test_supervisor_program_golden_reference(tmp_path: Path) -> None:
    assert_golden(
        "supervisor-devpi-server.conf-reference",
        supervisor.program_content(ctx_for(tmp_path, acme_config())),
    )


def test_supervisor_program_golden_custom(tmp_path: Path) -> None:
    assert_golden(
        "supervisor-devpi-server.conf-custom",
        supervisor.program_content(ctx_for(tmp_path, internal_config())),
    )


def test_supervisor_program_values(tmp_path: Path) -> None:
    text = supervisor.program_content(ctx_for(tmp_path, internal_config()))
    assert (
        "command=/opt/devpi-agent/venv/bin/devpi-server "
        "--configfile /etc/devpi-server/devpi-server.yml\n"
    ) in text
    assert "directory=/srv/devpi\n" in text
    assert "user=pypi\n" in text
    assert 'REQUESTS_CA_BUNDLE="/etc/ssl/certs/ca-certificates.crt"' in text
    assert "stdout_logfile=/var/log/supervisor/devpi-server.log\n" in text


# --- facts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("v2.6.2 h1:QnKDiR6UQkOWZSvJ1Ws6LLbCfNkOT3OBWDJo7xFTZe8=\n", (2, 6, 2)),
        ("2.6.2\n", (2, 6, 2)),
        ("v2.10.0 h1:fonubSaQKF1YANl8TXqGcn4IbIRUDdfAkpcsfI/vX5U=\n", (2, 10, 0)),
        ("v2.8.4 h1:q3pe0wpBj1OcHFZ3n/1nl4V4bxBrYoSoab7rL9BMYNk=", (2, 8, 4)),
        ("", None),
        ("caddy: command not found", None),
    ],
)
def test_parse_caddy_version(text: str, expected: tuple[int, int, int] | None) -> None:
    assert parse_caddy_version(text) == expected


UBUNTU_2404_OS_RELEASE = """\
PRETTY_NAME="Ubuntu 24.04.1 LTS"
NAME="Ubuntu"
VERSION_ID="24.04"
VERSION="24.04.1 LTS (Noble Numbat)"
VERSION_CODENAME=noble
ID=ubuntu
ID_LIKE=debian
HOME_URL="https://www.ubuntu.com/"
SUPPORT_URL="https://help.ubuntu.com/"
BUG_REPORT_URL="https://bugs.launchpad.net/ubuntu/"
PRIVACY_POLICY_URL="https://www.ubuntu.com/legal/terms-and-policies/privacy-policy"
UBUNTU_CODENAME=noble
LOGO=ubuntu-logo
"""

DEBIAN_12_OS_RELEASE = """\
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
SUPPORT_URL="https://www.debian.org/support"
BUG_REPORT_URL="https://bugs.debian.org/"
"""


def test_parse_os_release_ubuntu_2404() -> None:
    release = parse_os_release(UBUNTU_2404_OS_RELEASE)
    assert release == OsRelease("ubuntu", "24.04", "noble")
    assert release.pretty == "ubuntu 24.04 (noble)"


def test_parse_os_release_debian_12() -> None:
    release = parse_os_release(DEBIAN_12_OS_RELEASE)
    assert release == OsRelease("debian", "12", "bookworm")
    assert release.pretty == "debian 12 (bookworm)"


def test_parse_os_release_ignores_comments_and_blank_lines() -> None:
    text = '# a comment\n\nID=debian\n  VERSION_ID = "12"\n'
    assert parse_os_release(text) == OsRelease("debian", "12", "")


def test_parse_os_release_empty() -> None:
    assert parse_os_release("") == OsRelease("unknown", "", "")


def test_parse_os_release_single_quotes() -> None:
    assert parse_os_release("ID='debian'\nVERSION_ID='12'\n") == OsRelease("debian", "12", "")


# --- apt.dearmor ------------------------------------------------------------------------------


def _crc24(data: bytes) -> int:
    """RFC 4880 section 6.1."""
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def armor(data: bytes, *, headers: list[str], width: int = 64) -> str:
    body = base64.b64encode(data).decode()
    checksum = base64.b64encode(_crc24(data).to_bytes(3, "big")).decode()
    lines = [
        "-----BEGIN PGP PUBLIC KEY BLOCK-----",
        *headers,
        "",
        *textwrap.wrap(body, width),
        f"={checksum}",
        "-----END PGP PUBLIC KEY BLOCK-----",
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture
def key_bytes() -> bytes:
    # Not a real key; dearmor only decodes. Long enough for many base64 lines.
    return bytes([0x99, 0x01, 0x0D]) + random.Random(42).randbytes(1200)


@pytest.mark.parametrize(
    "headers",
    [[], ["Version: GnuPG v2"], ["Comment: https://dl.cloudsmith.io", "Version: Cloudsmith"]],
    ids=["no-headers", "one-header", "two-headers"],
)
@pytest.mark.parametrize("width", [64, 76])
def test_dearmor(key_bytes: bytes, headers: list[str], width: int) -> None:
    armored = armor(key_bytes, headers=headers, width=width)
    assert dearmor(armored) == key_bytes


def test_dearmor_crlf_and_surrounding_text(key_bytes: bytes) -> None:
    armored = armor(key_bytes, headers=["Version: x"]).replace("\n", "\r\n")
    assert dearmor("some preamble\r\n" + armored + "trailing junk\r\n") == key_bytes


def test_dearmor_without_blank_line(key_bytes: bytes) -> None:
    armored = armor(key_bytes, headers=[]).replace("-----\n\n", "-----\n")
    assert dearmor(armored) == key_bytes


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("not a key at all\n", id="no-armor"),
        pytest.param(
            "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\n!!!notbase64!!!\n"
            "-----END PGP PUBLIC KEY BLOCK-----\n",
            id="bad-base64",
        ),
    ],
)
def test_dearmor_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        dearmor(text)


def metrics_config() -> Config:
    data = reference_data()
    data["users"].append({"name": "ci", "password": CI_PASSWORD})
    data["metrics"] = {"enabled": True}
    return parse(data)


@pytest.mark.parametrize("version", list(VERSIONS))
def test_caddyfile_golden_metrics(tmp_path: Path, version: str) -> None:
    """metrics.enabled turns on Caddy's request metrics for every server: `servers { metrics }`
    before 2.9 (2.6.0 added it; 2.6.2 validates it), the global `metrics` from 2.9; off, neither."""
    rendered = caddy.content(ctx_for(tmp_path, metrics_config()), VERSIONS[version], CURRENT)
    nested = "\tservers {\n\t\tmetrics\n\t}\n" in rendered
    top_level = "\n\tmetrics\n" in rendered
    # 2.9.0 moved the option to the top level and deprecated the nested one.
    assert (nested, top_level) == ((False, True) if version == "2.10.0" else (True, False))
    assert_golden(f"Caddyfile-{version}-metrics", rendered)
    plain = caddy.content(ctx_for(tmp_path, acme_config()), VERSIONS[version], CURRENT)
    assert "metrics" not in plain
