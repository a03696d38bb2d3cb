"""Replication (issue #7): the config's role settings, the files each role renders (golden),
and the steps' role-dependent logic: the shared secret, the primary's CA, devpi-init on a
replica, no users made on a replica, and the verify verdicts.

UPDATE_GOLDEN=1 pytest tests/unit/test_replication.py rewrites the golden files.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Call,
    FakeRunner,
    assert_golden,
    make_ctx,
    program,
    reference_data,
    result,
)

from agent.commands import backup, verify
from agent.core.config import Config, ConfigError, parse
from agent.core.context import StepFailed
from agent.core.runner import Result, ShRunner
from agent.host import replica_pki, replication
from agent.host.replica_pki import Bundle
from agent.steps import caddy, devpi_config, devpi_init, devpi_users, supervisor, upgrade

DEVOPS_HASH = "$2b$04$vnLW09wuDFphFKEaULf.7eKN72dlq6Rrc2udYRrpKu7X1Q0HW5Qja"  # "change-me"
CURRENT = f"\tbasicauth {{\n\t\tdevops {DEVOPS_HASH}\n\t}}\n"
SECRET = b"aW5zdGVhZCBvZiBhIHJlYWwgc2VjcmV0LCB0aGlzIG9uZQ==\n"
# A self-signed CA certificate (openssl req -x509 -newkey ec ... -subj /CN=primary-ca -days 36500).
PRIMARY_CA = """-----BEGIN CERTIFICATE-----
MIIBgTCCASegAwIBAgIUZ437nOteXrrYzIJXMj2qMjY6wTQwCgYIKoZIzj0EAwIw
FTETMBEGA1UEAwwKcHJpbWFyeS1jYTAgFw0yNjExMjcwMzE1MDJaGA8yMTI2MTEw
MzAzMTUwMlowFTETMBEGA1UEAwwKcHJpbWFyeS1jYTBZMBMGByqGSM49AgEGCCqG
SM49AwEHA0IABDrp60ca2Df/vXV+a+vCq1xLNg4zEWioaTLQ5zcdwQ5rtBl6Gzr4
JpYuDV+IpIdjpUc4cI+iRVDy6mgZk4jVg7ejUzBRMB0GA1UdDgQWBBQ7gRlsJfLG
dM632KIMQfZgcLb9KDAfBgNVHSMEGDAWgBQ7gRlsJfLGdM632KIMQfZgcLb9KDAP
BgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIEdLr2VazhHIJKakipuk
HnJe6XSMwf+iku+oizzIwR6xAiEAz+A/bnW/XlCGB46+Pa4xBalw8ALWkiOErU/e
X1DiijY=
-----END CERTIFICATE-----
"""


@pytest.fixture(scope="session")
def pki() -> tuple[Bundle, Bundle]:
    """A replication CA and the certificate it issued to replica eu-1, made by the agent's own
    code with the real openssl."""
    ca = replica_pki.new_ca(ShRunner())
    return ca, replica_pki.issue(ShRunner(), ca, "eu-1")


@pytest.fixture
def secret_file(tmp_path: Path, pki: tuple[Bundle, Bundle]) -> Path:
    path = tmp_path / "etc-secret"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    # The replica's certificate beside it (replica_data names it).
    cert = tmp_path / "replica.pem"
    cert.write_bytes(pki[1].pem)
    cert.chmod(0o600)
    return path


def primary_data(secret_file: Path | None = None) -> dict[str, Any]:
    data = reference_data()
    data["server"] = {
        "domain": "pypi.example.com",
        "https_port": 443,
        "tls": "internal",
        "http_port": 0,
    }
    data["devpi"] = {
        "port": 4040,
        "role": "primary",
        "replication_port": 8444,
        "replica_addresses": ["10.0.0.5", "10.0.1.0/24", "2001:db8::7"],
        "replicas": ["eu-1"],
    }
    if secret_file is not None:
        data["devpi"]["secret_file"] = str(secret_file)
    return data


def replica_data(secret_file: Path, ca_file: Path | None = None) -> dict[str, Any]:
    data = reference_data()
    data["server"] = {"domain": "eu.pypi.example.com", "acme_email": "ops@example.com"}
    data["devpi"] = {
        "role": "replica",
        "primary_url": "https://pypi.example.com:8444",
        "secret_file": str(secret_file),
        "replica_cert_file": str(secret_file.parent / "replica.pem"),
    }
    if ca_file is not None:
        data["devpi"]["primary_ca_file"] = str(ca_file)
    return data


def error_of(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse(data)
    return caught.value


# --- config -----------------------------------------------------------------------------------


def test_default_role_is_standalone() -> None:
    devpi = parse(reference_data()).devpi
    assert devpi.role == "standalone"
    assert devpi.replication_port is None and devpi.secret is None


def test_primary_parses(secret_file: Path) -> None:
    devpi = parse(primary_data(secret_file)).devpi
    assert devpi.role == "primary"
    assert devpi.replication_port == 8444
    assert devpi.replica_addresses == ("10.0.0.5", "10.0.1.0/24", "2001:db8::7")
    assert devpi.secret == SECRET
    assert "aW5zdGVhZ" not in repr(devpi)


def test_primary_secret_file_is_optional() -> None:
    assert parse(primary_data()).devpi.secret is None


def test_replica_parses(secret_file: Path, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    data = replica_data(secret_file, ca)
    data["devpi"]["primary_url"] = "https://pypi.example.com:8444/"
    devpi = parse(data).devpi
    assert devpi.role == "replica"
    assert devpi.primary_url == "https://pypi.example.com:8444"
    assert devpi.primary_ca_file == ca
    assert devpi.secret == SECRET


@pytest.mark.parametrize(
    ("role", "key", "value", "message"),
    [
        ("standalone", "replication_port", 8444, 'only used with role = "primary"'),
        ("standalone", "primary_url", "https://p:1", 'only used with role = "replica"'),
        ("replica", "replica_addresses", ["10.0.0.5"], 'only used with role = "primary"'),
        ("primary", "primary_ca_file", "/ca.pem", 'only used with role = "replica"'),
        ("standalone", "secret_file", "/s", 'role = "primary" or "replica", not "standalone"'),
    ],
)
def test_setting_of_another_role(
    secret_file: Path, role: str, key: str, value: object, message: str
) -> None:
    data = primary_data() if role == "primary" else replica_data(secret_file)
    if role == "standalone":
        data["devpi"] = {"role": "standalone"}
    data["devpi"][key] = value
    error = error_of(data)
    assert error.key == f"devpi.{key}"
    assert message in error.message


def test_unknown_role() -> None:
    data = reference_data()
    data["devpi"]["role"] = "master"
    error = error_of(data)
    assert error.key == "devpi.role"
    assert '"standalone", "primary", "replica"' in error.message


@pytest.mark.parametrize("missing", ["replication_port", "replica_addresses", "replicas"])
def test_primary_needs(missing: str) -> None:
    data = primary_data()
    del data["devpi"][missing]
    error = error_of(data)
    assert error.key == f"devpi.{missing}"
    assert 'required with role = "primary"' in error.message


@pytest.mark.parametrize("missing", ["primary_url", "secret_file", "replica_cert_file"])
def test_replica_needs(secret_file: Path, missing: str) -> None:
    data = replica_data(secret_file)
    del data["devpi"][missing]
    error = error_of(data)
    assert error.key == f"devpi.{missing}"
    assert 'required with role = "replica"' in error.message


@pytest.mark.parametrize(
    ("addresses", "key", "message"),
    [
        ([], "devpi.replica_addresses", "at least one"),
        (["10.0.0.5", "pypi.example.com"], "devpi.replica_addresses[1]", "not an IP address"),
        (["10.0.0.5/24"], "devpi.replica_addresses[0]", "not an IP address or a network"),
        (["10.0.0.5", "10.0.0.5"], "devpi.replica_addresses[1]", "listed twice"),
        ([5], "devpi.replica_addresses[0]", "expected a string"),
        ("10.0.0.5", "devpi.replica_addresses", "expected a list"),
    ],
)
def test_bad_replica_addresses(addresses: object, key: str, message: str) -> None:
    data = primary_data()
    data["devpi"]["replica_addresses"] = addresses
    error = error_of(data)
    assert error.key == key
    assert message in error.message


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("pypi.example.com:8444", "not an https:// URL"),
        ("ftp://pypi.example.com", "not an https:// URL"),
        ("https://", "not an https:// URL"),
        ("https://pypi.example.com:99999", "not an https:// URL"),
        ("https://pypi.example.com/ x", "not an https:// URL"),
        # Relayed uploads carry users' passwords: never in clear text.
        ("http://10.0.0.1:4040", "not an https:// URL"),
        ("https://devops:pw@pypi.example.com:8444", "must not hold credentials"),
        ("https://pypi.example.com:8444/devops/pypi/+simple/", "has a path"),
        ("https://pypi.example.com:8444/?x=1", "has a path"),
    ],
)
def test_bad_primary_url(secret_file: Path, url: str, message: str) -> None:
    data = replica_data(secret_file)
    data["devpi"]["primary_url"] = url
    error = error_of(data)
    assert error.key == "devpi.primary_url"
    assert message in error.message


@pytest.mark.parametrize(
    ("names", "key", "message"),
    [
        ([], "devpi.replicas", "at least one"),
        (["eu-1", "eu-1"], "devpi.replicas[1]", "listed twice"),
        (["EU 1"], "devpi.replicas[0]", "lowercase letters, digits and dashes"),
        (["../etc"], "devpi.replicas[0]", "lowercase letters, digits and dashes"),
        (["-x"], "devpi.replicas[0]", "lowercase letters, digits and dashes"),
        ([7], "devpi.replicas[0]", "expected a string"),
    ],
)
def test_bad_replica_names(names: object, key: str, message: str) -> None:
    data = primary_data()
    data["devpi"]["replicas"] = names
    error = error_of(data)
    assert (error.key, message in error.message) == (key, True), error


@pytest.mark.parametrize("role", ["primary", "replica"])
@pytest.mark.parametrize("version", ["6.20.1", "6.9.0", "5.5.0"])
def test_replication_refuses_a_devpi_that_leaks_its_changelog(
    secret_file: Path, role: str, version: str
) -> None:
    data = primary_data() if role == "primary" else replica_data(secret_file)
    data["devpi"]["server_version"] = version
    error = error_of(data)
    assert error.key == "devpi.server_version"
    assert "6.20.2" in error.message and "changelog" in error.message


@pytest.mark.parametrize("version", ["6.20.2", "6.20.3", "7.0.0"])
def test_replication_accepts_a_fixed_devpi(version: str) -> None:
    data = primary_data()
    data["devpi"].update(server_version=version, unlocked=version != "6.20.3")
    assert parse(data).devpi.server_version == version


def test_replica_cert_file_must_exist(secret_file: Path, tmp_path: Path) -> None:
    data = replica_data(secret_file)
    data["devpi"]["replica_cert_file"] = str(tmp_path / "missing.pem")
    error = error_of(data)
    assert (error.key, "does not exist" in error.message) == ("devpi.replica_cert_file", True)


def test_primary_proxy_port_collides(secret_file: Path) -> None:
    data = replica_data(secret_file)
    data["devpi"]["primary_proxy_port"] = 4040
    error = error_of(data)
    assert (error.key, "already devpi.port" in error.message) == ("devpi.primary_proxy_port", True)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"tiny-Qx7\n", "too short or too uniform"), (b"ab" * 32, "too short or too uniform")],
)
def test_weak_secret_file(tmp_path: Path, secret_file: Path, content: bytes, message: str) -> None:
    weak = tmp_path / "weak"
    weak.write_bytes(content)
    error = error_of(replica_data(weak))
    assert error.key == "devpi.secret_file"
    assert message in error.message
    assert content.decode().strip() not in str(error)


def test_missing_secret_file(tmp_path: Path, secret_file: Path) -> None:
    error = error_of(replica_data(tmp_path / "nope"))
    assert error.key == "devpi.secret_file"
    assert "does not exist" in error.message


def test_relative_secret_file() -> None:
    data = primary_data()
    data["devpi"]["secret_file"] = "secret"
    error = error_of(data)
    assert (error.key, "not an absolute path" in error.message) == ("devpi.secret_file", True)


@pytest.mark.parametrize(
    ("server", "devpi_port", "message"),
    [
        ({"https_port": 8444}, 4040, "already server.https_port"),
        ({"http_port": 8444}, 4040, "already server.http_port"),
        ({}, 8444, "already devpi.port"),
    ],
)
def test_replication_port_collides(server: dict[str, int], devpi_port: int, message: str) -> None:
    data = primary_data()
    data["server"].update(server)
    data["devpi"]["port"] = devpi_port
    error = error_of(data)
    assert message in str(error)
    assert error.key in ("devpi.replication_port", "devpi.port")


# --- rendered files ---------------------------------------------------------------------------


def primary_config() -> Config:
    return parse(primary_data())


def replica_config(secret_file: Path, ca_file: Path | None = None) -> Config:
    return parse(replica_data(secret_file, ca_file))


@pytest.mark.parametrize("version", [(2, 6, 2), (2, 10, 0)])
def test_caddyfile_primary_golden(tmp_path: Path, version: tuple[int, int, int]) -> None:
    ctx = make_ctx(tmp_path, primary_config(), FakeRunner())
    rendered = caddy.content(ctx, version, CURRENT)
    assert_golden(f"Caddyfile-{'.'.join(map(str, version))}-primary", rendered)


@pytest.mark.parametrize("version", [(2, 6, 2), (2, 10, 0)])
def test_caddyfile_replica_golden(
    tmp_path: Path, secret_file: Path, version: tuple[int, int, int]
) -> None:
    ctx = make_ctx(tmp_path, replica_config(secret_file), FakeRunner())
    rendered = caddy.content(ctx, version, CURRENT)
    assert_golden(f"Caddyfile-{'.'.join(map(str, version))}-replica", rendered)


def test_caddyfile_primary_site_admits_issued_certificates_only(
    tmp_path: Path, pki: tuple[Bundle, Bundle]
) -> None:
    ctx = make_ctx(tmp_path, primary_config(), FakeRunner())
    issued = tmp_path / str(replica_pki.issued_file("eu-1")).lstrip("/")
    issued.parent.mkdir(parents=True)
    issued.write_bytes(pki[1].pem)
    rendered = caddy.content(ctx, (2, 6, 2), CURRENT)
    main, replication_site = rendered.split("\npypi.example.com:8444 {\n")
    # The main site keeps the changelog closed to everyone.
    assert 'respond @changelog "Forbidden" 403' in main
    assert "\ttls internal {\n\t\tclient_auth {\n\t\t\tmode require_and_verify\n" in (
        replication_site
    )
    assert f"trusted_ca_cert_file {replication.REPLICA_CA_COPY}\n" in replication_site
    assert "\t\tremote_ip 10.0.0.5 10.0.1.0/24 2001:db8::7\n" in replication_site
    pin = f"\t\tvars {{http.request.tls.client.fingerprint}} {pki[1].fingerprint}\n"
    assert pin in replication_site
    # No header opens the site any more, and no password is asked for on it.
    assert "Bearer" not in replication_site and "basicauth" not in replication_site
    assert "respond" in replication_site.split("handle {")[-1]
    assert "strict_sni_host insecure_off" in main.split("\n}\n")[0]
    assert caddy.existing_hashes(rendered) == {"devops": DEVOPS_HASH}


def test_caddyfile_primary_before_any_certificate_admits_nobody(tmp_path: Path) -> None:
    # plan on a fresh primary: nothing issued yet, and the pin matches no fingerprint.
    rendered = caddy.content(make_ctx(tmp_path, primary_config(), FakeRunner()), (2, 6, 2), None)
    assert "vars {http.request.tls.client.fingerprint} none-issued-yet\n" in rendered


def test_caddyfile_replica_proxies_to_its_primary_with_its_certificate(
    tmp_path: Path, secret_file: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text(PRIMARY_CA)
    ctx = make_ctx(tmp_path, replica_config(secret_file, ca), FakeRunner())
    rendered = caddy.content(ctx, (2, 6, 2), CURRENT)
    proxy = rendered.split("\nhttp://127.0.0.1:3142 {\n")[1]
    assert "\tbind 127.0.0.1\n\treverse_proxy https://pypi.example.com:8444 {\n" in proxy
    assert (
        f"tls_client_auth {replication.CLIENT_CERT_COPY} {replication.CLIENT_KEY_COPY}\n" in proxy
    )
    assert f"tls_trusted_ca_certs {replication.PRIMARY_CA_COPY}\n" in proxy


def test_caddyfile_standalone_has_no_replication(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, parse(reference_data()), FakeRunner())
    rendered = caddy.content(ctx, (2, 6, 2), CURRENT)
    assert "remote_ip" not in rendered and "@write" not in rendered


def test_devpi_server_yml_primary_golden(tmp_path: Path) -> None:
    rendered = devpi_config.content(make_ctx(tmp_path, primary_config(), FakeRunner()))
    assert_golden("devpi-server.yml-primary", rendered)
    assert "\n  role: primary\n" in rendered


def test_devpi_server_yml_replica_golden(tmp_path: Path, secret_file: Path) -> None:
    ctx = make_ctx(tmp_path, replica_config(secret_file), FakeRunner())
    rendered = devpi_config.content(ctx)
    assert_golden("devpi-server.yml-replica", rendered)
    # devpi goes through this host's Caddy, which presents the replica's certificate.
    assert "\n  primary-url: http://127.0.0.1:3142\n" in rendered


def test_devpi_server_yml_standalone_has_no_role(tmp_path: Path) -> None:
    rendered = devpi_config.content(make_ctx(tmp_path, parse(reference_data()), FakeRunner()))
    assert "role" not in rendered and "primary" not in rendered


def test_supervisor_program_replica_golden(tmp_path: Path, secret_file: Path) -> None:
    ca = tmp_path / "ca.pem"
    ctx = make_ctx(tmp_path, replica_config(secret_file, ca), FakeRunner())
    rendered = supervisor.program_content(ctx)
    assert_golden("supervisor-devpi-server.conf-replica", rendered)
    assert 'REQUESTS_CA_BUNDLE="/etc/devpi-server/primary-ca-bundle.pem"' in rendered


# --- steps ------------------------------------------------------------------------------------


def under(tmp_path: Path, path: Path | str) -> Path:
    return tmp_path / str(path).lstrip("/")


def test_ca_bundle_is_system_roots_plus_primary_ca(tmp_path: Path, secret_file: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text(PRIMARY_CA)
    system = under(tmp_path, "/etc/ssl/certs/ca-certificates.crt")
    system.parent.mkdir(parents=True)
    system.write_text("SYSTEM ROOTS\n")
    ctx = make_ctx(tmp_path, replica_config(secret_file, ca), FakeRunner())
    devpi_config.converge(ctx)
    bundle = under(tmp_path, replication.PRIMARY_CA_BUNDLE).read_text()
    assert bundle == "SYSTEM ROOTS\n" + PRIMARY_CA
    assert ctx.is_pending("devpi-server-restart")
    # Once there, nothing changes.
    again = make_ctx(tmp_path, replica_config(secret_file, ca), FakeRunner())
    devpi_config.converge(again)
    assert again.changes == []


def test_ca_bundle_refuses_a_non_certificate(tmp_path: Path, secret_file: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    ctx = make_ctx(tmp_path, replica_config(secret_file, ca), FakeRunner())
    with pytest.raises(StepFailed, match=r"devpi\.primary_ca_file"):
        devpi_config.converge(ctx)


def test_ca_bundle_removed_when_no_longer_needed(tmp_path: Path, secret_file: Path) -> None:
    bundle = under(tmp_path, replication.PRIMARY_CA_BUNDLE)
    bundle.parent.mkdir(parents=True)
    bundle.write_text("old")
    ctx = make_ctx(tmp_path, replica_config(secret_file), FakeRunner())
    devpi_config.converge(ctx)
    assert not bundle.exists()
    assert f"remove {replication.PRIMARY_CA_BUNDLE}" in ctx.changes


def fake_devpi_init(tmp_path: Path, role: str) -> FakeRunner:
    def init(call: Call) -> Result:
        staging = under(tmp_path, call.argv[call.argv.index("--serverdir") + 1])
        staging.mkdir(parents=True)
        (staging / ".nodeinfo").write_text(json.dumps({"role": role, "uuid": "x"}))
        return result(call.argv)

    return FakeRunner().on(program("devpi-init"), init)


def test_replica_init_copies_secret_and_makes_no_root_password(
    tmp_path: Path, secret_file: Path
) -> None:
    runner = fake_devpi_init(tmp_path, "replica")
    ctx = make_ctx(tmp_path, replica_config(secret_file), runner)
    devpi_init.converge(ctx)
    secret = under(tmp_path, "/var/lib/devpi/secret")
    assert secret.read_bytes() == SECRET
    assert secret.stat().st_mode & 0o777 == 0o600
    assert not under(tmp_path, "/etc/devpi-agent/root.pass").exists()
    # The secret came from the file: devpi-gen-secret never ran; devpi-init without a password.
    [init] = runner.calls
    assert init.program == "devpi-init"
    assert init.env == {}
    assert all(SECRET.decode().strip() not in c.diff for c in ctx.files.changes)


def test_changed_secret_restarts_devpi(tmp_path: Path, secret_file: Path) -> None:
    server = under(tmp_path, "/var/lib/devpi/server")
    server.mkdir(parents=True)
    (server / ".nodeinfo").write_text(json.dumps({"role": "primary"}))
    under(tmp_path, "/var/lib/devpi/secret").write_bytes(b"x" * 44)
    root_pass = under(tmp_path, "/etc/devpi-agent/root.pass")
    root_pass.parent.mkdir(parents=True)
    root_pass.write_text("existing-root-password\n")
    ctx = make_ctx(tmp_path, parse(primary_data(secret_file)), FakeRunner())
    devpi_init.converge(ctx)
    assert under(tmp_path, "/var/lib/devpi/secret").read_bytes() == SECRET
    assert ctx.is_pending("devpi-server-restart")
    again = make_ctx(tmp_path, parse(primary_data(secret_file)), FakeRunner())
    devpi_init.converge(again)
    assert again.changes == []


def test_replica_refuses_a_standalone_server_dir(tmp_path: Path, secret_file: Path) -> None:
    server = under(tmp_path, "/var/lib/devpi/server")
    server.mkdir(parents=True)
    (server / ".nodeinfo").write_text(json.dumps({"role": "standalone"}))
    ctx = make_ctx(tmp_path, replica_config(secret_file), FakeRunner())
    with pytest.raises(StepFailed, match="holds a standalone devpi server; a replica starts"):
        devpi_init.converge(ctx)


def test_promoting_a_replica_is_allowed(tmp_path: Path, secret_file: Path) -> None:
    server = under(tmp_path, "/var/lib/devpi/server")
    server.mkdir(parents=True)
    (server / ".nodeinfo").write_text(json.dumps({"role": "replica"}))
    ctx = make_ctx(tmp_path, parse(primary_data(secret_file)), FakeRunner())
    devpi_init.converge(ctx)  # no StepFailed: devpi turns a replica into a primary itself


def test_replica_creates_no_users(tmp_path: Path, secret_file: Path) -> None:
    ctx = make_ctx(tmp_path, replica_config(secret_file), FakeRunner())
    devpi_users.converge(ctx)  # no devpi call at all: a FakeRunner and no server behind it
    assert ctx.changes == []


@pytest.mark.parametrize(
    ("remote", "warned"), [({}, True), ({"devops": None}, True), ("complete", False)]
)
def test_replica_names_declared_users_its_primary_lacks(
    tmp_path: Path,
    secret_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    remote: object,
    warned: bool,
) -> None:
    from agent.host.devpi_api import RemoteIndex, RemoteUser

    users = (
        {"devops": RemoteUser("devops", {"pypi": RemoteIndex("pypi", ("root/pypi",))})}
        if remote == "complete"
        else {name: RemoteUser(name, {}) for name in remote}  # type: ignore[union-attr]
    )
    monkeypatch.setattr(replication.DevpiApi, "users", lambda self: users)
    ctx = make_ctx(tmp_path, replica_config(secret_file), FakeRunner())
    seen: list[str] = []
    monkeypatch.setattr(ctx.log, "warning", lambda event, **kw: seen.append(event))
    replication.report_replicated_users(ctx)
    assert bool(seen) == warned
    assert ctx.changes == []


# --- verify -----------------------------------------------------------------------------------


class FakeStatus:
    """Answers devpi_status / primary_status from scripted serials."""

    def __init__(self, replica_serials: list[int], primary_serial: int | Exception) -> None:
        self.replica_serials = replica_serials
        self.primary_serial = primary_serial

    def replica(self, port: int, timeout: float = 15) -> dict[str, Any]:
        serial = (
            self.replica_serials.pop(0)
            if len(self.replica_serials) > 1
            else (self.replica_serials[0])
        )
        return {
            "role": "REPLICA",
            "serial": serial,
            "update-from-primary-at": 0.0,
            "replication-errors": {},
        }

    def primary(self, config: Config, timeout: float = 20) -> dict[str, Any]:
        if isinstance(self.primary_serial, Exception):
            raise self.primary_serial
        return {"serial": self.primary_serial}


def patch_status(monkeypatch: pytest.MonkeyPatch, status: FakeStatus) -> None:
    monkeypatch.setattr(replication, "devpi_status", status.replica)
    monkeypatch.setattr(replication, "primary_status", status.primary)
    monkeypatch.setattr(replication.time, "sleep", lambda seconds: None)


def test_replica_in_sync(monkeypatch: pytest.MonkeyPatch, secret_file: Path) -> None:
    patch_status(monkeypatch, FakeStatus([12], 12))
    ok, detail = replication.replica_verdict(replica_config(secret_file))
    assert ok, detail
    assert detail.startswith("serial 12, primary at 12: lag 0")


def test_replica_catches_up_within_grace(
    monkeypatch: pytest.MonkeyPatch, secret_file: Path
) -> None:
    patch_status(monkeypatch, FakeStatus([10, 11, 12], 12))
    ok, detail = replication.replica_verdict(replica_config(secret_file))
    assert ok, detail


def test_replica_behind(monkeypatch: pytest.MonkeyPatch, secret_file: Path) -> None:
    patch_status(monkeypatch, FakeStatus([7], 12))
    ok, detail = replication.replica_verdict(replica_config(secret_file), wait=0.01)
    assert not ok
    assert detail.startswith("5 changes behind the primary")


def test_primary_unreachable(monkeypatch: pytest.MonkeyPatch, secret_file: Path) -> None:
    refused = urllib.request.URLError(ConnectionRefusedError(111, "Connection refused"))
    patch_status(monkeypatch, FakeStatus([7], refused))
    ok, detail = replication.replica_verdict(replica_config(secret_file))
    assert not ok
    assert "https://pypi.example.com:8444 does not answer" in detail
    assert "serial 7" in detail


def test_wait_for_first_sync_fails_with_devpis_reasons(
    tmp_path: Path, secret_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = under(tmp_path, "/var/log/supervisor/devpi-server.log")
    log.parent.mkdir(parents=True)
    log.write_text("x [REP] 403 Forbidden: failed fetching https://pypi.example.com:8444/+c\n")
    monkeypatch.setattr(replication, "devpi_status", lambda port: {"serial": -1})
    monkeypatch.setattr(replication.time, "sleep", lambda seconds: None)
    ctx = make_ctx(tmp_path, replica_config(secret_file), FakeRunner())
    with pytest.raises(StepFailed, match="403 Forbidden") as caught:
        replication.wait_for_first_sync(ctx, timeout=0.0)
    assert "replica_addresses" in str(caught.value)


def test_wait_for_first_sync_returns_when_in_sync(
    tmp_path: Path, secret_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = [{"serial": -1}, {"serial": 3}, {"serial": 5, "replica-metadata-in-sync-at": 1.0}]
    monkeypatch.setattr(replication, "devpi_status", lambda port: answers.pop(0))
    monkeypatch.setattr(replication.time, "sleep", lambda seconds: None)
    ctx = make_ctx(tmp_path, replica_config(secret_file), FakeRunner())
    replication.wait_for_first_sync(ctx)
    assert answers == []


def test_replica_of_a_replaced_primary(monkeypatch: pytest.MonkeyPatch, secret_file: Path) -> None:
    patch_status(monkeypatch, FakeStatus([12], 12))
    monkeypatch.setattr(
        replication,
        "devpi_status",
        lambda port, timeout=15: {"role": "REPLICA", "serial": 12, "primary-uuid": "old"},
    )
    monkeypatch.setattr(
        replication, "primary_status", lambda config, timeout=20: {"serial": 3, "uuid": "new"}
    )
    ok, detail = replication.replica_verdict(replica_config(secret_file))
    assert not ok
    assert "the primary is another server now" in detail
    assert "move /var/lib/devpi/server away" in detail


def test_replica_refuses_export_import_upgrade(
    tmp_path: Path, secret_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = under(tmp_path, "/var/lib/devpi/server")
    server.mkdir(parents=True)
    (server / ".nodeinfo").write_text(json.dumps({"role": "replica"}))
    monkeypatch.setattr(upgrade, "installed_server_version", lambda ctx: "5.5.0")
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, replica_config(secret_file), runner)
    with pytest.raises(StepFailed, match="a replica is not upgraded by export and import"):
        upgrade.converge(ctx)
    assert runner.calls == []


def test_replica_refuses_restore(tmp_path: Path, secret_file: Path) -> None:
    ctx = make_ctx(tmp_path, replica_config(secret_file), FakeRunner())
    with pytest.raises(StepFailed, match="restore the backup on its primary"):
        backup.restore(ctx, tmp_path / "export", force=False)


def test_verify_adds_replication_only_with_a_role(secret_file: Path) -> None:
    assert verify.checks_for(parse(reference_data())) == verify.CHECKS
    names = [name for name, _ in verify.checks_for(replica_config(secret_file))]
    assert names[-1] == "replication"
    assert names[:-1] == [name for name, _ in verify.CHECKS]


def test_a_replica_dir_is_not_made_standalone(tmp_path: Path) -> None:
    server = under(tmp_path, "/var/lib/devpi/server")
    server.mkdir(parents=True)
    (server / ".nodeinfo").write_text(json.dumps({"role": "replica"}))
    ctx = make_ctx(tmp_path, parse(reference_data()), FakeRunner())
    with pytest.raises(StepFailed, match=r'to promote it, set devpi\.role = "primary"'):
        replication.check_server_dir_role(ctx)


# --- replication certificates -----------------------------------------------------------------


def test_primary_makes_its_ca_and_issues_each_replica_once(tmp_path: Path) -> None:
    data = primary_data()
    data["devpi"]["replicas"] = ["eu-1", "us-1"]
    ctx = make_ctx(tmp_path, parse(data), ShRunner())
    copies = replication.converge_certificates(ctx)
    ca = replica_pki.parse_bundle(
        (tmp_path / "etc/devpi-agent/replication-ca.pem").read_bytes(), "ca"
    )
    assert copies == {replication.REPLICA_CA_COPY: ca.cert_pem}
    assert b"PRIVATE KEY" not in copies[replication.REPLICA_CA_COPY]
    for name in ("eu-1", "us-1"):
        issued = tmp_path / f"etc/devpi-agent/replicas/{name}.pem"
        assert issued.stat().st_mode & 0o777 == 0o600
        bundle = replica_pki.parse_bundle(issued.read_bytes(), name)
        assert replica_pki.issued_by(bundle, ca)
        assert bundle.certificate.common_name == f"devpi replica {name}"
    assert (tmp_path / "etc/devpi-agent/replication-ca.pem").stat().st_mode & 0o777 == 0o600
    assert len(set(replication.replica_fingerprints(ctx))) == 2

    again = make_ctx(tmp_path, parse(data), FakeRunner())
    assert replication.converge_certificates(again) == copies
    assert again.changes == [] and again.runner.calls == []


def test_a_name_removed_from_replicas_is_revoked(tmp_path: Path) -> None:
    data = primary_data()
    data["devpi"]["replicas"] = ["eu-1", "us-1"]
    replication.converge_certificates(make_ctx(tmp_path, parse(data), ShRunner()))
    kept = replication.replica_fingerprints(make_ctx(tmp_path, parse(data), FakeRunner()))
    data["devpi"]["replicas"] = ["us-1"]
    ctx = make_ctx(tmp_path, parse(data), FakeRunner())
    replication.converge_certificates(ctx)
    assert ctx.changes == ["revoke replica eu-1: remove /etc/devpi-agent/replicas/eu-1.pem"]
    assert not (tmp_path / "etc/devpi-agent/replicas/eu-1.pem").exists()
    assert replication.replica_fingerprints(ctx) == kept[1:]


def test_a_new_ca_reissues_every_certificate(tmp_path: Path) -> None:
    config = primary_config()
    replication.converge_certificates(make_ctx(tmp_path, config, ShRunner()))
    before = replication.replica_fingerprints(make_ctx(tmp_path, config, FakeRunner()))
    (tmp_path / "etc/devpi-agent/replication-ca.pem").unlink()
    ctx = make_ctx(tmp_path, config, ShRunner())
    replication.converge_certificates(ctx)
    assert ctx.changes[0] == "make the replication CA in /etc/devpi-agent/replication-ca.pem"
    assert (
        "issue the client certificate of replica eu-1 in /etc/devpi-agent/replicas/eu-1.pem"
        in ctx.changes
    )
    assert replication.replica_fingerprints(ctx) != before


def test_plan_on_a_fresh_primary_changes_nothing(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, primary_config(), FakeRunner(), check=True)
    assert replication.converge_certificates(ctx) == {}
    assert ctx.changes == ["make the replication CA in /etc/devpi-agent/replication-ca.pem"]
    assert not (tmp_path / "etc").exists()


def test_replica_hands_caddy_its_certificate(
    tmp_path: Path, secret_file: Path, pki: tuple[Bundle, Bundle]
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text(PRIMARY_CA)
    copies = replication.converge_certificates(
        make_ctx(tmp_path, replica_config(secret_file, ca), FakeRunner())
    )
    assert copies[replication.CLIENT_CERT_COPY] == pki[1].cert_pem
    assert copies[replication.CLIENT_KEY_COPY] == pki[1].key_pem
    assert b"BEGIN CERTIFICATE" in copies[replication.PRIMARY_CA_COPY]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("cert-only", "one certificate and its private key"),
        ("mismatch", "not the certificate's"),
        ("two-certs", "one certificate and its private key"),
    ],
)
def test_replica_refuses_an_unusable_certificate(
    tmp_path: Path, secret_file: Path, pki: tuple[Bundle, Bundle], content: str, message: str
) -> None:
    ca, leaf = pki
    data = {
        "cert-only": leaf.cert_pem,
        "mismatch": leaf.cert_pem + ca.key_pem,
        "two-certs": leaf.cert_pem + ca.cert_pem + leaf.key_pem,
    }[content]
    (tmp_path / "replica.pem").write_bytes(data)
    ctx = make_ctx(tmp_path, replica_config(secret_file), FakeRunner())
    with pytest.raises(StepFailed) as caught:
        replication.converge_certificates(ctx)
    assert message in str(caught.value) and "devpi.replica_cert_file" in str(caught.value)
    assert "PRIVATE KEY" not in str(caught.value)


def test_primary_upstream_refuses_userinfo_even_past_validation(secret_file: Path) -> None:
    """ "https://primary:8444@0" parses with host "0": were config's check ever bypassed, the
    replica's Caddy would still not send replication traffic to a host the URL only hides."""
    import dataclasses

    config = replica_config(secret_file)
    assert replication.primary_upstream(config).startswith("https://")
    for url in ("https://primary.example.net:8444@0", "https://user@primary.example.net"):
        devpi = dataclasses.replace(config.devpi, primary_url=url)
        with pytest.raises(ValueError, match="without credentials"):
            replication.primary_upstream(dataclasses.replace(config, devpi=devpi))
