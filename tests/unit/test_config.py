"""agent.core.config: every invalid setting raises ConfigError naming the exact key."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REFERENCE_TOML, reference_data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core import config as cfg
from agent.core.config import Argon2Cost, ConfigError, load, parse

Mutator = Callable[[dict[str, Any]], None]


def parse_error(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(data)
    return info.value


def mutated(mutate: Mutator) -> dict[str, Any]:
    data = reference_data()
    mutate(data)
    return data


def write_password(tmp_path: Path, content: bytes, name: str = "devops.pass") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def with_password_file(path: Path | str) -> dict[str, Any]:
    data = reference_data()
    data["users"][0] = {"name": "devops", "password_file": str(path)}
    return data


# --- the reference config ---------------------------------------------------------------------


def test_reference_config_parses() -> None:
    config = parse(reference_data())
    assert config.server.domain == "pypi.example.com"
    assert config.server.https_port == 443
    assert config.server.tls == "acme"
    assert config.server.acme_email == "ops@example.com"
    assert config.devpi.port == 4040
    assert [(u.name, u.password, u.password_file) for u in config.users] == [
        ("devops", "change-me", None)
    ]
    assert [(i.user, i.index, i.bases, i.name) for i in config.indexes] == [
        ("devops", "pypi", ("root/pypi",), "devops/pypi")
    ]
    assert config.secrets() == ["change-me"]
    assert config.path is None


def test_reference_config_loads_from_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(REFERENCE_TOML, encoding="utf-8")
    config = load(path)
    assert config == parse(reference_data(), path)
    assert config.path == path


def test_user_password_is_not_in_repr() -> None:
    assert "change-me" not in repr(parse(reference_data()))


def test_defaults() -> None:
    config = parse(
        {
            "server": {"domain": "pypi.example.com"},
            "users": [{"name": "u", "password": "password-1"}],
        }
    )
    server, devpi = config.server, config.devpi
    assert server.https_port == 443
    assert server.http_port == 80
    assert server.tls == "acme"
    assert server.acme_email is None
    assert server.caddy_admin == "unix//var/lib/caddy-admin/admin.sock"
    assert devpi.port == 4040
    assert devpi.user == "devpi"
    assert devpi.home == Path("/var/lib/devpi")
    assert devpi.venv == Path("/opt/devpi-agent/venv")
    assert devpi.root_password_file == Path("/etc/devpi-agent/root.pass")
    assert (devpi.server_version, devpi.web_version, devpi.client_version) == (
        "6.20.3",
        "5.1.1",
        "7.3.0",
    )
    assert devpi.requirements == (
        "devpi-server==6.20.3",
        "devpi-web==5.1.1",
        "devpi-client==7.3.0",
    )
    assert devpi.indexer == "whoosh"
    assert devpi.mirror_project_list is False
    assert devpi.key_derivation == "rfc9106-low-memory"
    assert devpi.argon2_cost == Argon2Cost(memory_kib=65536, time_cost=3, parallelism=4)
    assert devpi.serverdir == Path("/var/lib/devpi/server")
    assert devpi.secretfile == Path("/var/lib/devpi/secret")
    assert config.apt.upgrade is False
    assert config.apt.lock_timeout == 600
    assert config.caddy.source == "distro"
    assert config.indexes == ()


def test_a_table_left_out_is_its_dataclass_defaults() -> None:
    """The parser takes every default from the dataclass field, so the two cannot drift."""
    config = parse(
        {"server": {"domain": "d.example.com"}, "users": [{"name": "u", "password": "password-1"}]}
    )
    assert config.server == cfg.ServerConfig(domain="d.example.com")
    assert (config.devpi, config.apt, config.caddy, config.backup) == (
        cfg.DevpiConfig(),
        cfg.AptConfig(),
        cfg.CaddyConfig(),
        cfg.BackupConfig(),
    )


def test_a_choice_lists_its_literal_values() -> None:
    error = parse_error(mutated(lambda d: d["server"].update(tls="self-signed")))
    assert error.key == "server.tls"
    assert error.message == '\'self-signed\' is not one of "acme", "internal", "files"'
    assert cfg.TLS_MODES == ("acme", "internal", "files")


def test_every_key_derivation_has_a_cost() -> None:
    assert tuple(cfg.KEY_DERIVATION_COSTS) == cfg.KEY_DERIVATIONS


def test_every_setting_can_be_given() -> None:
    data = reference_data()
    data["server"].update(http_port=8080, caddy_admin="127.0.0.1:2020")
    data["devpi"].update(
        user="pypi",
        home="/srv/devpi",
        venv="/srv/venv",
        root_password_file="/srv/root.pass",
        server_version="6.21.0",
        web_version="5.2.0",
        client_version="7.4.0.post1",
        unlocked=True,
        indexer="null",
        mirror_project_list=True,
        key_derivation="devpi",
    )
    data["apt"] = {"upgrade": True, "lock_timeout": 0}
    data["caddy"] = {"source": "official"}
    config = parse(data)
    assert config.server.http_port == 8080
    assert config.server.caddy_admin == "127.0.0.1:2020"
    assert config.devpi.serverdir == Path("/srv/devpi/server")
    assert config.devpi.requirements[2] == "devpi-client==7.4.0.post1"
    assert config.devpi.indexer == "null"
    assert config.devpi.mirror_project_list is True
    assert config.devpi.key_derivation == "devpi"
    assert config.devpi.argon2_cost is None
    assert (config.apt.upgrade, config.apt.lock_timeout) == (True, 0)
    assert config.caddy.source == "official"


@pytest.mark.parametrize(
    ("domain", "https_port", "expected"),
    [
        ("pypi.example.com", 443, "https://pypi.example.com"),
        ("pypi.example.com", 8443, "https://pypi.example.com:8443"),
        ("192.0.2.10", 443, "https://192.0.2.10"),
        ("2001:db8::1", 8443, "https://[2001:db8::1]:8443"),
    ],
)
def test_outside_url(domain: str, https_port: int, expected: str) -> None:
    data = reference_data()
    data["server"].update(domain=domain, https_port=https_port, tls="internal")
    assert parse(data).server.outside_url == expected


def test_http_port_zero_is_allowed() -> None:
    data = reference_data()
    data["server"]["http_port"] = 0
    assert parse(data).server.http_port == 0


def test_ip_domain_with_tls_internal_is_allowed() -> None:
    data = reference_data()
    data["server"].update(domain="192.0.2.10", tls="internal")
    assert parse(data).server.domain == "192.0.2.10"


def test_bases_may_name_declared_indexes_in_any_order() -> None:
    data = reference_data()
    data["indexes"] = [
        {"name": "devops/dev", "bases": ["devops/pypi"]},
        {"name": "devops/pypi", "bases": ["root/pypi"]},
    ]
    assert [i.bases for i in parse(data).indexes] == [("devops/pypi",), ("root/pypi",)]


# --- ConfigError names the key ----------------------------------------------------------------


def _set(table: str, key: str, value: Any) -> Mutator:
    def mutate(data: dict[str, Any]) -> None:
        data.setdefault(table, {})[key] = value

    return mutate


def _user(position: int, **values: Any) -> Mutator:
    def mutate(data: dict[str, Any]) -> None:
        data["users"][position].update(values)

    return mutate


def _drop(table: str, key: str) -> Mutator:
    def mutate(data: dict[str, Any]) -> None:
        del data[table][key]

    return mutate


def _top(key: str, value: Any) -> Mutator:
    def mutate(data: dict[str, Any]) -> None:
        data[key] = value

    return mutate


def _users(*users: Any) -> Mutator:
    return _top("users", list(users))


def _indexes(*indexes: Any) -> Mutator:
    return _top("indexes", list(indexes))


def _all(*mutators: Mutator) -> Mutator:
    def mutate(data: dict[str, Any]) -> None:
        for m in mutators:
            m(data)

    return mutate


def _remove(key: str) -> Mutator:
    def mutate(data: dict[str, Any]) -> None:
        del data[key]

    return mutate


ERROR_CASES: list[tuple[str, Mutator, str]] = [
    # unknown keys
    ("unknown top-level key", _top("bogus", 1), "bogus"),
    ("unknown key in [server]", _set("server", "bogus", 1), "server.bogus"),
    ("unknown key in [devpi]", _set("devpi", "bogus", 1), "devpi.bogus"),
    ("unknown key in [apt]", _set("apt", "bogus", 1), "apt.bogus"),
    ("unknown key in [caddy]", _set("caddy", "bogus", 1), "caddy.bogus"),
    ("unknown key in [[users]]", _user(0, bogus=1), "users[0].bogus"),
    (
        "unknown key in [[indexes]]",
        _indexes({"name": "devops/pypi", "bogus": 1}),
        "indexes[0].bogus",
    ),
    # wrong types
    ("string port", _set("server", "https_port", "443"), "server.https_port"),
    ("bool port", _set("server", "https_port", True), "server.https_port"),
    ("float port", _set("server", "http_port", 80.0), "server.http_port"),
    ("string devpi port", _set("devpi", "port", "4040"), "devpi.port"),
    ("list where table: server", _top("server", ["pypi.example.com"]), "server"),
    ("list where table: devpi", _top("devpi", [4040]), "devpi"),
    ("table where list: users", _top("users", {"name": "devops"}), "users"),
    ("string where table: users[0]", _users("devops"), "users[0]"),
    ("string where table: indexes[0]", _indexes("devops/pypi"), "indexes[0]"),
    ("int domain", _set("server", "domain", 1), "server.domain"),
    ("int password", _user(0, password=1234), "users[0].password"),
    ("string bases", _indexes({"name": "devops/pypi", "bases": "root/pypi"}), "indexes[0].bases"),
    ("int base", _indexes({"name": "devops/pypi", "bases": [1]}), "indexes[0].bases[0]"),
    ("string apt.upgrade", _set("apt", "upgrade", "yes"), "apt.upgrade"),
    ("negative lock timeout", _set("apt", "lock_timeout", -1), "apt.lock_timeout"),
    # [server]
    ("missing [server]", _remove("server"), "server"),
    ("missing server.domain", _drop("server", "domain"), "server.domain"),
    ("domain with space and !", _set("server", "domain", "bad domain!"), "server.domain"),
    ("domain label starts with -", _set("server", "domain", "-x.com"), "server.domain"),
    ("domain label ends with -", _set("server", "domain", "x-.com"), "server.domain"),
    ("empty domain", _set("server", "domain", ""), "server.domain"),
    ("domain over 253 chars", _set("server", "domain", "a." * 127 + "com"), "server.domain"),
    ("https_port 0", _set("server", "https_port", 0), "server.https_port"),
    ("https_port 70000", _set("server", "https_port", 70000), "server.https_port"),
    ("http_port 70000", _set("server", "http_port", 70000), "server.http_port"),
    ("http_port -1", _set("server", "http_port", -1), "server.http_port"),
    ("http_port == https_port", _set("server", "http_port", 443), "server.http_port"),
    ("devpi.port == https_port", _set("devpi", "port", 443), "devpi.port"),
    ("devpi.port == http_port", _set("devpi", "port", 80), "devpi.port"),
    ("devpi.port 0", _set("devpi", "port", 0), "devpi.port"),
    ("tls not acme/internal", _set("server", "tls", "selfsigned"), "server.tls"),
    ("tls acme with an IPv4 domain", _set("server", "domain", "192.0.2.10"), "server.tls"),
    ("tls acme with an IPv6 domain", _set("server", "domain", "2001:db8::1"), "server.tls"),
    ("acme_email without @", _set("server", "acme_email", "ops.example.com"), "server.acme_email"),
    ("acme_email without dot", _set("server", "acme_email", "ops@localhost"), "server.acme_email"),
    ("acme_email with space", _set("server", "acme_email", "o ps@ex.com"), "server.acme_email"),
    ("caddy_admin without port", _set("server", "caddy_admin", "localhost"), "server.caddy_admin"),
    (
        "caddy_admin port out of range",
        _set("server", "caddy_admin", "localhost:99999"),
        "server.caddy_admin",
    ),
    ("caddy_admin a URL", _set("server", "caddy_admin", "http://x:1"), "server.caddy_admin"),
    # [devpi], [caddy]
    ("devpi.user root", _set("devpi", "user", "root"), "devpi.user"),
    ("devpi.user upper case", _set("devpi", "user", "Devpi"), "devpi.user"),
    ("relative devpi.home", _set("devpi", "home", "var/lib/devpi"), "devpi.home"),
    ("bad server_version", _set("devpi", "server_version", "latest"), "devpi.server_version"),
    ("indexer not null/whoosh", _set("devpi", "indexer", "solr"), "devpi.indexer"),
    ("unknown key_derivation", _set("devpi", "key_derivation", "none"), "devpi.key_derivation"),
    ("caddy.source", _set("caddy", "source", "github"), "caddy.source"),
    # [[users]]
    ("no users", _users(), "users"),
    ("users key absent", _remove("users"), "users"),
    ("user named root", _user(0, name="root"), "users[0].name"),
    ("user name with slash", _user(0, name="dev/ops"), "users[0].name"),
    ("user without name", _users({"password": "password-1"}), "users[0].name"),
    (
        "duplicate users",
        _users(
            {"name": "devops", "password": "password-a"},
            {"name": "devops", "password": "password-b"},
        ),
        "users[1].name",
    ),
    (
        "both password and password_file",
        _user(0, password_file="/etc/devpi-agent/devops.pass"),
        "users[0]",
    ),
    ("neither password nor password_file", _users({"name": "devops"}), "users[0]"),
    ("empty password", _user(0, password=""), "users[0].password"),
    ("password under 8 characters", _user(0, password="x" * 7), "users[0].password"),
    ("73-byte ASCII password", _user(0, password="x" * 73), "users[0].password"),
    # 37 characters, 74 bytes in UTF-8: the limit counts bytes, not characters.
    ("multi-byte password over 72 bytes", _user(0, password="é" * 37), "users[0].password"),
    ("password with newline", _user(0, password="password\nb"), "users[0].password"),
    ("password with NUL", _user(0, password="password\x00b"), "users[0].password"),
    # [[indexes]]
    (
        "index of an undeclared user",
        _indexes({"name": "alice/pypi", "bases": ["root/pypi"]}),
        "indexes[0].name",
    ),
    ("index name without slash", _indexes({"name": "devops"}), "indexes[0].name"),
    ("index name with two slashes", _indexes({"name": "devops/a/b"}), "indexes[0].name"),
    ("index of root", _indexes({"name": "root/mine"}), "indexes[0].name"),
    ("index without name", _indexes({"bases": ["root/pypi"]}), "indexes[0].name"),
    (
        "duplicate index",
        _indexes({"name": "devops/pypi"}, {"name": "devops/pypi"}),
        "indexes[1].name",
    ),
    (
        "base neither root/pypi nor declared",
        _indexes({"name": "devops/pypi", "bases": ["root/other"]}),
        "indexes[0].bases[0]",
    ),
    (
        "base of a declared user but undeclared index",
        _indexes({"name": "devops/pypi", "bases": ["root/pypi", "devops/nope"]}),
        "indexes[0].bases[1]",
    ),
    (
        "base listed twice",
        _indexes({"name": "devops/pypi", "bases": ["root/pypi", "root/pypi"]}),
        "indexes[0].bases[1]",
    ),
    (
        "base is not user/index",
        _indexes({"name": "devops/pypi", "bases": ["pypi"]}),
        "indexes[0].bases[0]",
    ),
    (
        "index based on itself",
        _indexes({"name": "devops/pypi", "bases": ["devops/pypi"]}),
        "indexes[0].bases",
    ),
    (
        "cyclic bases a -> b -> a",
        _indexes(
            {"name": "devops/pypi", "bases": ["root/pypi"]},
            {"name": "devops/a", "bases": ["devops/b"]},
            {"name": "devops/b", "bases": ["devops/a"]},
        ),
        "indexes[1].bases",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "key"),
    [pytest.param(mutate, key, id=name) for name, mutate, key in ERROR_CASES],
)
def test_invalid_config_names_the_key(mutate: Mutator, key: str) -> None:
    error = parse_error(mutated(mutate))
    assert error.key == key
    assert str(error).startswith(f"{key}: ")
    assert error.message


def test_cycle_message_shows_the_cycle() -> None:
    error = parse_error(
        mutated(
            _indexes(
                {"name": "devops/a", "bases": ["devops/b"]},
                {"name": "devops/b", "bases": ["devops/a"]},
            )
        )
    )
    assert error.key == "indexes[0].bases"
    assert "devops/a -> devops/b -> devops/a" in error.message


def test_password_errors_do_not_echo_the_password() -> None:
    error = parse_error(mutated(_user(0, password="s3cr3t-" + "x" * 70)))
    assert "s3cr3t" not in str(error)


# --- password files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"file-secret\n", "file-secret"),
        (b"file-secret", "file-secret"),
        (b"file-secret\r\n", "file-secret"),
        (b" spaced out ", " spaced out "),
        ("pässwörd\n".encode(), "pässwörd"),
        (b"x" * 72 + b"\n", "x" * 72),
    ],
)
def test_password_file_is_read_and_trailing_newline_stripped(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = write_password(tmp_path, content)
    config = parse(with_password_file(path))
    assert config.users[0].password == expected
    assert config.users[0].password_file == path
    assert config.secrets() == [expected]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\n", id="only-newline"),
        pytest.param(b"x" * 73, id="73-bytes"),
        pytest.param(("é" * 37).encode(), id="multibyte-74-bytes"),
        pytest.param(b"first\nsecond\n", id="two-lines"),
        pytest.param(b"\xff\xfe-not-utf8", id="not-utf8"),
    ],
)
def test_bad_password_file_content(tmp_path: Path, content: bytes) -> None:
    error = parse_error(with_password_file(write_password(tmp_path, content)))
    assert error.key == "users[0].password_file"


def test_missing_password_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pass"
    error = parse_error(with_password_file(missing))
    assert error.key == "users[0].password_file"
    assert str(missing) in error.message
    assert "does not exist" in error.message


def test_password_file_is_a_directory(tmp_path: Path) -> None:
    error = parse_error(with_password_file(tmp_path))
    assert error.key == "users[0].password_file"
    assert "directory" in error.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_password_file(tmp_path: Path) -> None:
    path = write_password(tmp_path, b"secret\n")
    path.chmod(0)
    error = parse_error(with_password_file(path))
    assert error.key == "users[0].password_file"
    assert "not readable" in error.message


def test_unreadable_password_file_simulated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As root, mode 000 does not stop a read: simulate the EACCES instead."""
    path = write_password(tmp_path, b"secret\n")
    real_open = Path.open

    def open_(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    error = parse_error(with_password_file(path))
    assert error.key == "users[0].password_file"
    assert "not readable" in error.message


def test_relative_password_file() -> None:
    error = parse_error(with_password_file("devops.pass"))
    assert error.key == "users[0].password_file"


def test_password_file_below_a_regular_file(tmp_path: Path) -> None:
    regular = write_password(tmp_path, b"secret\n")
    error = parse_error(with_password_file(regular / "devops.pass"))
    assert error.key == "users[0].password_file"


def test_password_file_with_nul(tmp_path: Path) -> None:
    error = parse_error(with_password_file(f"{tmp_path}/a\x00b"))
    assert error.key == "users[0].password_file"


# --- trailing newline slips past the `$`-anchored regexes --------------------------------------


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        pytest.param(_set("server", "domain", "pypi.example.com\n"), "server.domain", id="domain"),
        pytest.param(
            _set("server", "acme_email", "ops@example.com\n"), "server.acme_email", id="email"
        ),
        pytest.param(
            _set("server", "caddy_admin", "localhost:2019\n"), "server.caddy_admin", id="admin"
        ),
        pytest.param(_set("devpi", "user", "devpi\n"), "devpi.user", id="devpi-user"),
        pytest.param(
            _set("devpi", "server_version", "6.20.3\n"), "devpi.server_version", id="version"
        ),
        pytest.param(
            _all(_users({"name": "ci\n", "password": "password-1"}), _indexes()),
            "users[0].name",
            id="user-name",
        ),
    ],
)
def test_trailing_newline_is_rejected(mutate: Mutator, key: str) -> None:
    assert parse_error(mutated(mutate)).key == key


# --- load() -----------------------------------------------------------------------------------


def load_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    error = load_error(path)
    assert error.key == ""
    assert str(path) in str(error)
    assert "does not exist" in str(error)


def test_load_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(REFERENCE_TOML.replace("ops@", "ops\xe9@").encode("latin-1"))
    error = load_error(path)
    assert error.key == ""
    assert str(path) in str(error)
    assert "UTF-8" in str(error)


def test_load_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(REFERENCE_TOML + "[server\n", encoding="utf-8")
    error = load_error(path)
    assert error.key == ""
    assert str(path) in str(error)
    assert "not valid TOML" in str(error)


def test_load_below_a_regular_file(tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_text("")
    assert load_error(regular / "config.toml").key == ""


def test_load_directory(tmp_path: Path) -> None:
    error = load_error(tmp_path)
    assert error.key == ""
    assert "directory" in str(error)


def test_load_reports_validation_errors_with_key(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(REFERENCE_TOML.replace("https_port = 443", "https_port = 0"), "utf-8")
    assert load_error(path).key == "server.https_port"


def test_load_with_password_file(tmp_path: Path) -> None:
    password = write_password(tmp_path, b"from-file\n")
    path = tmp_path / "config.toml"
    path.write_text(
        REFERENCE_TOML.replace('password = "change-me"', f'password_file = "{password}"'),
        "utf-8",
    )
    assert load(path).users[0].password == "from-file"


# --- property: junk never escapes as anything but ConfigError ----------------------------------

KNOWN_KEYS: dict[str, list[str]] = {
    "": ["server", "devpi", "apt", "caddy", "users", "indexes"],
    "server": [
        "domain",
        "https_port",
        "http_port",
        "tls",
        "acme_email",
        "caddy_admin",
        "acme_ca",
        "acme_ca_root",
        "acme_preflight",
        "cert_file",
        "key_file",
    ],
    "devpi": [
        "port",
        "user",
        "home",
        "venv",
        "root_password_file",
        "server_version",
        "web_version",
        "client_version",
        "indexer",
        "mirror_project_list",
        "key_derivation",
    ],
    "apt": ["upgrade", "lock_timeout"],
    "caddy": ["source"],
    # password_file is left out: it reads the filesystem.
    "users[0]": ["name", "password"],
    "indexes[0]": ["name", "bases"],
}

scalars = (
    st.text(max_size=30)
    | st.integers()
    | st.integers(min_value=-1, max_value=70000)
    | st.booleans()
    | st.floats(allow_nan=True)
    | st.sampled_from(["root/pypi", "devops/pypi", "devops", "192.0.2.1", "::1", "a@b.c", "x:1"])
)
junk = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
places = st.sampled_from(sorted(KNOWN_KEYS)).flatmap(
    lambda table: st.tuples(
        st.just(table),
        st.sampled_from(KNOWN_KEYS[table]) | st.text(min_size=1, max_size=12),
    )
)


def _place(data: dict[str, Any], table: str, key: str, value: Any) -> None:
    if table == "":
        data[key] = value
    elif table == "users[0]":
        data["users"][0][key] = value
    elif table == "indexes[0]":
        data["indexes"][0][key] = value
    else:
        data.setdefault(table, {})[key] = value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(place=places, value=junk)
def test_junk_raises_only_config_error(place: tuple[str, str], value: Any) -> None:
    table, key = place
    data = reference_data()
    _place(data, table, key, value)
    try:
        parse(data)
    except ConfigError as error:
        assert isinstance(error.key, str)


@settings(max_examples=100, deadline=None)
@given(value=junk)
def test_junk_as_whole_document_raises_only_config_error(value: Any) -> None:
    data = value if isinstance(value, dict) else {"server": value}
    with contextlib.suppress(ConfigError):
        parse(data)


def test_bcrypt_limit_constant() -> None:
    assert cfg.BCRYPT_MAX_PASSWORD_BYTES == 72
