"""A corpus of invalid configs through the real command line: every one exits 2, names the
offending key, and never gets as far as touching the host (the converge function is replaced by
one that fails the test). Hand-written cases, plus cases generated with hypothesis.

The counts go to test-artifacts/reliability.json for docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import REPO_ROOT, reference_data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.commands import cli
from agent.commands import converge as converge_cli
from agent.core.config import BCRYPT_MAX_PASSWORD_BYTES

RESULTS = REPO_ROOT / "test-artifacts" / "reliability.json"
REJECTED: dict[str, int] = {"hand-written": 0, "generated": 0}


@pytest.fixture(autouse=True)
def never_converge(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an invalid config got as far as converging the host")

    monkeypatch.setattr(converge_cli, "_converge", refuse)


@pytest.fixture(scope="module", autouse=True)
def record_counts() -> Iterator[None]:
    yield
    total = sum(REJECTED.values())
    if total:
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results["bad_input"] = {**REJECTED, "total": total, "exit_2_with_key": total}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


# --- writing TOML (the tests need arbitrary documents, including wrong types) ------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else _string(name)


def _string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if value == value and abs(value) != float("inf") else "nan"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def dump(doc: dict[str, Any]) -> str:
    """TOML for `doc`: scalars first, then tables, then arrays of tables."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in doc.items() if not _is_table(v)]
    for name, body in doc.items():
        if isinstance(body, dict):
            lines.append(f"[{_key(name)}]")
            lines += [f"{_key(k)} = {_value(v)}" for k, v in body.items()]
        elif _is_table(body):
            for item in body:
                lines.append(f"[[{_key(name)}]]")
                lines += [f"{_key(k)} = {_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def _is_table(value: Any) -> bool:
    return isinstance(value, dict) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
    )


def reference() -> dict[str, Any]:
    return reference_data()


def rejected(tmp_path: Path, text: str | bytes, key: str, *, kind: str) -> str:
    """Run `apply` and `plan` on the config; both must exit 2 naming `key`. Returns stderr."""
    path = tmp_path / "config.toml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    stderr = ""
    for command in ("apply", "plan"):
        result = CliRunner().invoke(cli.main, [command, "--config", str(path)])
        assert result.exit_code == 2, (command, key, result.output, result.exception)
        assert result.stdout == ""
        stderr = result.stderr
        assert f"devpi-agent: invalid config: {key}" in stderr, (key, stderr)
        assert "nothing was changed on this host" in stderr
    REJECTED[kind] += 1
    return stderr


# --- hand-written -----------------------------------------------------------------------------


def mutate(path: str, value: Any) -> dict[str, Any]:
    """The reference config with one setting (dotted path, [n] for arrays) set or deleted."""
    doc = reference()
    *parents, last = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    node: Any = doc
    for part in parents:
        node = node[int(part[1:-1])] if part.startswith("[") else node.setdefault(part, {})
    if value is DELETE:
        del node[last]
    elif last.startswith("["):
        node[int(last[1:-1])] = value
    else:
        node[last] = value
    return doc


DELETE = object()

CASES: list[tuple[str, Any, str]] = [
    # (setting, bad value, the key the message must name)
    ("server", "pypi.example.com", "server"),
    ("server.domain", DELETE, "server.domain"),
    ("server.domain", "", "server.domain"),
    ("server.domain", "-pypi.example.com", "server.domain"),
    ("server.domain", "pypi_server.example.com", "server.domain"),
    ("server.domain", "pypi example.com", "server.domain"),
    ("server.domain", "a" * 64 + ".example.com", "server.domain"),
    ("server.domain", "pypi..example.com", "server.domain"),
    ("server.domain", 443, "server.domain"),
    ("server.domain", "10.0.0.1", "server.tls"),  # acme needs a DNS name
    ("server.https_port", 0, "server.https_port"),
    ("server.https_port", 65536, "server.https_port"),
    ("server.https_port", "443", "server.https_port"),
    ("server.https_port", 443.0, "server.https_port"),
    ("server.https_port", True, "server.https_port"),
    ("server.http_port", -1, "server.http_port"),
    ("server.http_port", 443, "server.http_port"),  # same as https_port
    ("server.tls", "letsencrypt", "server.tls"),
    ("server.acme_email", "ops-at-example.com", "server.acme_email"),
    ("server.caddy_admin", "2019", "server.caddy_admin"),
    ("server.caddy_admin", "localhost:99999", "server.caddy_admin"),
    ("server.colour", "blue", "server.colour"),
    ("devpi.port", 443, "devpi.port"),  # taken by server.https_port
    ("devpi.port", 70000, "devpi.port"),
    ("devpi.user", "root", "devpi.user"),
    ("devpi.user", "Devpi User", "devpi.user"),
    ("devpi.home", "var/lib/devpi", "devpi.home"),
    ("devpi.venv", ["/opt/venv"], "devpi.venv"),
    ("devpi.server_version", "latest", "devpi.server_version"),
    ("devpi.indexer", "elasticsearch", "devpi.indexer"),
    ("apt.upgrade", "yes", "apt.upgrade"),
    ("apt.lock_timeout", -5, "apt.lock_timeout"),
    ("caddy.source", "github", "caddy.source"),
    ("bogus", 1, "bogus"),
    ("users", DELETE, "users"),
    ("users", "devops", "users"),
    ("users[0]", "devops", "users[0]"),
    ("users[0].name", DELETE, "users[0].name"),
    ("users[0].name", "root", "users[0].name"),
    ("users[0].name", "dev/ops", "users[0].name"),
    ("users[0].password", "short", "users[0].password"),
    ("users[0].password", "p" * (BCRYPT_MAX_PASSWORD_BYTES + 1), "users[0].password"),
    ("users[0].password", "€" * 25, "users[0].password"),  # 25 characters, 75 bytes
    ("users[0].password", "line\nbreak-password", "users[0].password"),
    ("users[0].password", DELETE, "users[0]"),  # neither password nor password_file
    ("users[0].password_file", "/etc/devpi-agent/devops.pass", "users[0]"),  # both
    ("users[0].role", "admin", "users[0].role"),
    ("indexes[0].name", "ops/pypi", "indexes[0].name"),  # user not declared
    ("indexes[0].name", "root/pypi", "indexes[0].name"),
    ("indexes[0].name", "devops", "indexes[0].name"),
    ("indexes[0].bases", "root/pypi", "indexes[0].bases"),
    ("indexes[0].bases", ["devops/missing"], "indexes[0].bases[0]"),
    ("indexes[0].bases", ["devops/pypi"], "indexes[0].bases"),  # its own base: a cycle
    ("indexes[0].bases", ["root/pypi", "root/pypi"], "indexes[0].bases[1]"),
    ("indexes[0].bases", [42], "indexes[0].bases[0]"),
    # Values that would inject into the files the agent writes (issue #12, item 5).
    ("server.domain", "fe80::1%x]:443 {\nreverse_proxy 127.0.0.1:4040\n}", "server.domain"),
    ("server.acme_email", "{$AWS_SECRET_ACCESS_KEY}@example.com", "server.acme_email"),
    ("backup.dir", "/var/backups/devpi\n[Service]\nExecStartPre=/bin/id", "backup.dir"),
    ("devpi.home", "/var/lib/devpi\n[program:x]", "devpi.home"),
    ("devpi.venv", "/opt/my venv", "devpi.venv"),
]


@pytest.mark.parametrize(("setting", "value", "key"), CASES, ids=[c[0] for c in CASES])
def test_invalid_setting(tmp_path: Path, setting: str, value: Any, key: str) -> None:
    rejected(tmp_path, dump(mutate(setting, value)), key, kind="hand-written")


def test_duplicate_users(tmp_path: Path) -> None:
    doc = reference()
    doc["users"].append({"name": "devops", "password": "another-password"})
    rejected(tmp_path, dump(doc), "users[1].name", kind="hand-written")


def test_duplicate_indexes(tmp_path: Path) -> None:
    doc = reference()
    doc["indexes"].append({"name": "devops/pypi"})
    rejected(tmp_path, dump(doc), "indexes[1].name", kind="hand-written")


def test_cyclic_bases(tmp_path: Path) -> None:
    doc = reference()
    doc["indexes"] = [
        {"name": "devops/a", "bases": ["devops/b"]},
        {"name": "devops/b", "bases": ["devops/c"]},
        {"name": "devops/c", "bases": ["devops/a", "root/pypi"]},
    ]
    stderr = rejected(tmp_path, dump(doc), "indexes[0].bases", kind="hand-written")
    assert "devops/a -> devops/b -> devops/c -> devops/a" in stderr


def test_config_not_utf8(tmp_path: Path) -> None:
    text = dump(reference()).replace("change-me", "caf\xe9-pass").encode("latin-1")
    stderr = rejected(tmp_path, text, str(tmp_path / "config.toml"), kind="hand-written")
    assert "is not UTF-8" in stderr


def test_config_not_toml(tmp_path: Path) -> None:
    stderr = rejected(tmp_path, "[server\ndomain = 1\n", str(tmp_path), kind="hand-written")
    assert "not valid TOML" in stderr


def test_config_empty(tmp_path: Path) -> None:
    rejected(tmp_path, "", "server", kind="hand-written")


PASSWORD_FILE = "users[0].password_file"


def with_password_file(tmp_path: Path, path: Path | str) -> str:
    doc = reference()
    doc["users"][0] = {"name": "devops", "password_file": str(path)}
    return dump(doc)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"caf\xe9-password\n", "is not UTF-8"),
        (b"", "shorter than 8"),
        (b"\xef\xbb\xbf" + b"x" * 72 + b"\n", "longer than 72 bytes"),
        ("ü".encode() * 37, "longer than 72 bytes"),
    ],
    ids=["not-utf8", "empty", "73-bytes-with-bom", "37-umlauts"],
)
def test_bad_password_file(tmp_path: Path, content: bytes, problem: str) -> None:
    secret = tmp_path / "devops.pass"
    secret.write_bytes(content)
    stderr = rejected(
        tmp_path,
        with_password_file(tmp_path, secret),
        "users[0].password_file",
        kind="hand-written",
    )
    assert problem in stderr


@pytest.mark.parametrize("kind", ["missing", "directory", "under-a-file", "relative", "mode-000"])
def test_unreadable_password_file(tmp_path: Path, kind: str) -> None:
    target: Path | str = tmp_path / "missing.pass"
    if kind == "directory":
        target = tmp_path
    elif kind == "under-a-file":
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "devops.pass"
    elif kind == "relative":
        target = "devops.pass"
    elif kind == "mode-000":
        target = tmp_path / "locked.pass"
        target.write_text("a-good-password\n")
        target.chmod(0)
        if os.geteuid() == 0:
            # root reads any mode; a path through a file is as unreadable to root as it gets
            target = Path("/etc/hostname/devops.pass")
    rejected(
        tmp_path,
        with_password_file(tmp_path, target),
        "users[0].password_file",
        kind="hand-written",
    )


# --- generated --------------------------------------------------------------------------------

# Every setting of the reference schema with the TOML type it must have.
TYPED_SETTINGS: dict[str, type] = {
    "server.domain": str,
    "server.https_port": int,
    "server.http_port": int,
    "server.tls": str,
    "server.acme_email": str,
    "server.caddy_admin": str,
    "devpi.port": int,
    "devpi.user": str,
    "devpi.home": str,
    "devpi.venv": str,
    "devpi.root_password_file": str,
    "devpi.server_version": str,
    "devpi.web_version": str,
    "devpi.client_version": str,
    "devpi.indexer": str,
    "apt.upgrade": bool,
    "apt.lock_timeout": int,
    "caddy.source": str,
    "users[0].name": str,
    "users[0].password": str,
    "indexes[0].name": str,
    "indexes[0].bases": list,
}

_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
_any_toml = st.one_of(
    _scalars,
    st.lists(_scalars, max_size=3),
    st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True), _scalars, max_size=2),
)


def _toml_type(value: Any) -> type:
    return bool if isinstance(value, bool) else type(value)


GENERATED = settings(
    max_examples=12,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@GENERATED
@given(
    setting=st.sampled_from(sorted(TYPED_SETTINGS)),
    value=_any_toml,
)
def test_generated_wrong_type(tmp_path: Path, setting: str, value: Any) -> None:
    wanted = TYPED_SETTINGS[setting]
    if _toml_type(value) is wanted:
        value = [value] if wanted is not list else "not-a-list"
    rejected(tmp_path, dump(mutate(setting, value)), setting, kind="generated")


@GENERATED
@given(
    table=st.sampled_from(["", "server", "devpi", "apt", "caddy", "users[0]", "indexes[0]"]),
    name=st.from_regex(r"x_[a-z0-9_]{0,10}", fullmatch=True),
    value=_scalars,
)
def test_generated_unknown_key(tmp_path: Path, table: str, name: str, value: Any) -> None:
    setting = f"{table}.{name}" if table else name
    rejected(tmp_path, dump(mutate(setting, value)), setting, kind="generated")


@GENERATED
@given(
    setting=st.sampled_from(["server.https_port", "server.http_port", "devpi.port"]),
    port=st.one_of(st.integers(max_value=-1), st.integers(min_value=65536, max_value=2**63 - 1)),
)
def test_generated_bad_port(tmp_path: Path, setting: str, port: int) -> None:
    rejected(tmp_path, dump(mutate(setting, port)), setting, kind="generated")


_label = st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True)
_bad_domain = st.one_of(
    st.tuples(_label, st.sampled_from(list(" _/!*@,;'\"%$#(){}"))).map(
        lambda t: t[0] + t[1] + t[0]
    ),
    _label.map(lambda label: "-" + label),
    _label.map(lambda label: label + "-.example.com"),
    _label.map(lambda label: label * 64 + ".com"),
    _label.map(lambda label: label + "..com"),
    st.lists(_label, min_size=40, max_size=60).map(lambda ls: ".".join(x * 7 for x in ls)),
)


@GENERATED
@given(domain=_bad_domain)
def test_generated_bad_domain(tmp_path: Path, domain: str) -> None:
    rejected(tmp_path, dump(mutate("server.domain", domain)), "server.domain", kind="generated")


@GENERATED
@given(
    password=st.text(
        alphabet=st.characters(blacklist_characters="\r\n\x00", blacklist_categories=["Cs"]),
        min_size=19,
        max_size=120,
    ).filter(lambda p: len(p.encode()) > BCRYPT_MAX_PASSWORD_BYTES)
)
def test_generated_password_over_72_bytes(tmp_path: Path, password: str) -> None:
    stderr = rejected(
        tmp_path, dump(mutate("users[0].password", password)), "users[0].password", kind="generated"
    )
    assert password not in stderr


def test_the_corpus_is_big_enough() -> None:
    # runs last in this module: the parametrized and generated cases above all counted
    assert sum(REJECTED.values()) >= 50, REJECTED
