"""devpi-users' login memo: a no-op skips devpi's argon2 check of each password, and anything
that changed devpi's database (a password set behind the agent's back) brings the check back.
The logins that are needed run side by side."""

from __future__ import annotations

import hashlib
import hmac
import stat
import threading
from pathlib import Path
from typing import Any

from conftest import FakeRunner, make_ctx, reference_data

from agent.core.config import Config, parse
from agent.core.context import Context
from agent.host import login_memo
from agent.host.devpi_api import RemoteIndex, RemoteUser
from agent.steps import devpi_users

UUID = "a62d339cb2144c12907d86d50ce8d819"


def config(*users: tuple[str, str]) -> Config:
    data: dict[str, Any] = reference_data()
    if users:
        data["users"] = [{"name": n, "password": p} for n, p in users]
        data["indexes"] = [{"name": f"{n}/pypi", "bases": ["root/pypi"]} for n, _ in users]
    return parse(data)


class Devpi:
    """devpi as the step sees it through DevpiApi: users, the database's uuid and serial, and
    which password each user logs in with."""

    def __init__(self, cfg: Config) -> None:
        self.passwords = {u.name: u.password for u in cfg.users}
        self.db_uuid = UUID
        self.db_serial = 3
        self.uuid: str | None = None
        self.serial: str | None = None
        self.logins: list[str] = []
        self.calls: list[tuple[str, ...]] = []
        self.on_login = lambda name: None

    def users(self) -> dict[str, RemoteUser]:
        self.uuid, self.serial = self.db_uuid, str(self.db_serial)
        root = RemoteUser("root", {"pypi": RemoteIndex("root/pypi", (), "mirror", True)})
        users = {"root": root}
        for name in self.passwords:
            index = RemoteIndex(f"{name}/pypi", ("root/pypi",))
            users[name] = RemoteUser(name, {"pypi": index})
        return users

    def password_matches(self, user: str, password: str) -> bool:
        self.logins.append(user)
        self.on_login(user)
        return self.passwords.get(user) == password

    def login(self, user: str, password: str) -> bool:
        self.calls.append(("login", user))
        return True

    def set_password(self, user: str, password: str) -> None:
        self.calls.append(("set_password", user))
        self.passwords[user] = password
        self.db_serial += 1

    def behind_the_agents_back(self, user: str, password: str) -> None:
        """`devpi user -m USER password=...`: a write to devpi's database."""
        self.passwords[user] = password
        self.db_serial += 1


def with_root_password(tmp_path: Path) -> None:
    (tmp_path / "etc/devpi-agent").mkdir(parents=True, exist_ok=True)
    (tmp_path / "etc/devpi-agent/root.pass").write_text("root-password-1\n")


def run(tmp_path: Path, cfg: Config, devpi: Devpi, check: bool = False) -> Context:
    ctx = make_ctx(tmp_path, cfg, FakeRunner(), check=check)
    devpi.logins.clear()
    devpi_users._converge(ctx, devpi)  # type: ignore[arg-type]
    return ctx


def test_a_no_op_logs_in_once_then_not_while_devpi_is_unchanged(tmp_path: Path) -> None:
    cfg = config()
    devpi = Devpi(cfg)
    assert run(tmp_path, cfg, devpi).changes == []
    assert devpi.logins == ["devops"]
    for _ in range(2):
        assert run(tmp_path, cfg, devpi).changes == []
        assert devpi.logins == []


def test_a_password_changed_behind_the_agents_back_is_set_again(tmp_path: Path) -> None:
    with_root_password(tmp_path)
    cfg = config()
    devpi = Devpi(cfg)
    run(tmp_path, cfg, devpi)
    run(tmp_path, cfg, devpi)
    assert devpi.logins == []  # the memo holds
    devpi.behind_the_agents_back("devops", "someone-elses-password")
    ctx = run(tmp_path, cfg, devpi)
    assert devpi.logins == ["devops"]
    assert ctx.changes == ["set the password of devpi user devops"]
    assert ("set_password", "devops") in devpi.calls
    assert devpi.passwords["devops"] == cfg.users[0].password
    # That run changed devpi: it saved nothing, so the next one checks again, then remembers.
    assert run(tmp_path, cfg, devpi).changes == []
    assert devpi.logins == ["devops"]
    run(tmp_path, cfg, devpi)
    assert devpi.logins == []


def test_a_new_database_or_a_new_password_in_the_config_is_checked(tmp_path: Path) -> None:
    cfg = config()
    devpi = Devpi(cfg)
    run(tmp_path, cfg, devpi)
    devpi.db_uuid = "0" * 32  # a restore, an import, a reinitialised server: same serial
    run(tmp_path, cfg, devpi)
    assert devpi.logins == ["devops"]
    with_root_password(tmp_path)
    rotated = config(("devops", "a-rotated-password"))
    ctx = run(tmp_path, rotated, devpi)
    assert devpi.logins == ["devops"]
    assert ctx.changes == ["set the password of devpi user devops"]


def test_without_devpis_serial_there_is_no_memo(tmp_path: Path) -> None:
    cfg = config()
    devpi = Devpi(cfg)
    answered = devpi.users

    def without_headers() -> dict[str, RemoteUser]:
        users = answered()
        devpi.uuid = devpi.serial = None
        return users

    devpi.users = without_headers  # type: ignore[method-assign]
    for _ in range(2):
        run(tmp_path, cfg, devpi)
        assert devpi.logins == ["devops"]


def test_plan_uses_the_memo_and_writes_nothing(tmp_path: Path) -> None:
    cfg = config()
    devpi = Devpi(cfg)
    run(tmp_path, cfg, devpi, check=True)
    assert devpi.logins == ["devops"]
    assert not (tmp_path / "var/lib/devpi-agent").exists()
    run(tmp_path, cfg, devpi)
    run(tmp_path, cfg, devpi, check=True)
    assert devpi.logins == []


def test_the_memo_cannot_be_checked_without_its_key(tmp_path: Path) -> None:
    """Someone who gets the memo (not the root-only key) cannot test password guesses at
    HMAC speed with what devpi answers anyone (its uuid and serial)."""
    cfg = config()
    devpi = Devpi(cfg)
    run(tmp_path, cfg, devpi)
    memo = (tmp_path / "var/lib/devpi-agent/devpi-logins.memo").read_text()
    proof = dict(line.split(" ", 1) for line in memo.splitlines())["devops"]
    password = cfg.users[0].password
    for key in ("", UUID, "3", f"{UUID}\0003", "devops"):
        for message in (
            password,
            f"devpi-login\0{UUID}\0003\0devops\0{password}",
            f"{UUID}\0003\0devops\0{password}",
        ):
            guess = hmac.new(key.encode(), message.encode(), hashlib.sha256).hexdigest()
            assert not hmac.compare_digest(guess, proof), (key, message)
    key_file = tmp_path / "var/lib/devpi-agent/devpi-logins.memo-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / login_memo.MEMO.relative_to("/")).stat().st_mode) == 0o600
    assert len(bytes.fromhex(key_file.read_text().strip())) >= 32


def test_the_logins_that_are_needed_run_side_by_side(tmp_path: Path) -> None:
    cfg = config(("alice", "alice-pw-1"), ("bob", "bob-pw-22"), ("carol", "carol-pw-3"))
    devpi = Devpi(cfg)
    # Each login waits until all three are in flight: one after the other would time out.
    barrier = threading.Barrier(3, timeout=10)
    devpi.on_login = lambda name: barrier.wait()
    assert run(tmp_path, cfg, devpi).changes == []
    assert sorted(devpi.logins) == ["alice", "bob", "carol"]
    devpi.on_login = lambda name: None
    # A wrong password among them: reported and set in the config's order, as before.
    with_root_password(tmp_path)
    devpi.behind_the_agents_back("bob", "changed")
    ctx = run(tmp_path, cfg, devpi)
    assert sorted(devpi.logins) == ["alice", "bob", "carol"]
    assert ctx.changes == ["set the password of devpi user bob"]
