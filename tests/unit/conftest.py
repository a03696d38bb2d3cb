"""Shared helpers for the unit tier: a fake command runner, a Context builder, golden files.

Nothing here touches the host: files go under pytest's tmp_path (Files(root=tmp_path)), commands
go to FakeRunner, which only records them and answers from rules.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

# The agent package lives at the repository root and is not installed in the dev venv.
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Hypothesis keeps its example database out of the checkout (it defaults to ./.hypothesis).
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "devpi-agent-unit-hypothesis")

from agent.core import config as agent_config  # noqa: E402
from agent.core.config import Config  # noqa: E402
from agent.core.context import Context  # noqa: E402
from agent.core.files import Files  # noqa: E402
from agent.core.runner import CommandFailed, Result  # noqa: E402
from agent.facts.system import OsRelease  # noqa: E402

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"

REFERENCE_TOML = """\
[server]
domain = "pypi.example.com"
https_port = 443
tls = "acme"
acme_email = "ops@example.com"
[devpi]
port = 4040
[[users]]
name = "devops"
password = "change-me"
[[indexes]]
name = "devops/pypi"
bases = ["root/pypi"]
"""

DEBIAN_12 = OsRelease("debian", "12", "bookworm")
UBUNTU_2404 = OsRelease("ubuntu", "24.04", "noble")


# `systemctl show UNIT --property=ActiveState,UnitFileState` of a running, enabled unit.
ACTIVE_AND_ENABLED = "ActiveState=active\nUnitFileState=enabled\n"


def reference_data() -> dict[str, Any]:
    """The reference config as parse() sees it: a fresh, mutable dict on every call."""
    return {
        "server": {
            "domain": "pypi.example.com",
            "https_port": 443,
            "tls": "acme",
            "acme_email": "ops@example.com",
        },
        "devpi": {"port": 4040},
        "users": [{"name": "devops", "password": "change-me"}],
        "indexes": [{"name": "devops/pypi", "bases": ["root/pypi"]}],
    }


def reference_config() -> Config:
    return agent_config.parse(reference_data())


# --- FakeRunner -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One command the code under test asked to run, with every keyword it passed."""

    argv: tuple[str, ...]
    input: str | None = None
    env: Mapping[str, str] | None = None
    user: str | None = None
    cwd: str | None = None
    timeout: float = 300
    check: bool = True
    progress: str | None = None

    def startswith(self, prefix: Sequence[str]) -> bool:
        return self.argv[: len(prefix)] == tuple(prefix)

    @property
    def program(self) -> str:
        """The basename of argv[0]: "devpi-init" for /opt/.../bin/devpi-init."""
        return Path(self.argv[0]).name if self.argv else ""


Matcher = Sequence[str] | Callable[[Call], bool]
Answer = Result | Callable[[Call], Result]


@dataclass
class Rule:
    matcher: Matcher
    answer: Answer
    times: int | None = None  # None: any number of times
    used: int = 0

    def matches(self, call: Call) -> bool:
        if self.times is not None and self.used >= self.times:
            return False
        if callable(self.matcher):
            return bool(self.matcher(call))
        return call.startswith(self.matcher)


def result(argv: Sequence[str] = (), rc: int = 0, stdout: str = "", stderr: str = "") -> Result:
    return Result(tuple(argv), rc, stdout, stderr, 0.0)


def program(name: str) -> Callable[[Call], bool]:
    """Matcher: argv[0]'s basename is `name` (for commands run by absolute path)."""
    return lambda call: call.program == name


@dataclass
class FakeRunner:
    """Implements agent.core.runner.Runner: records calls, answers from rules (first match wins).

    A rule is (argv-prefix or predicate, Result or callable(Call) -> Result); unmatched commands
    succeed with empty output. check=True and a non-zero rc raise CommandFailed, as ShRunner does.
    """

    rules: list[Rule] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    missing_programs: set[str] = field(default_factory=set)

    def on(
        self,
        matcher: Matcher,
        answer: Answer | None = None,
        *,
        rc: int = 0,
        stdout: str = "",
        stderr: str = "",
        times: int | None = None,
    ) -> FakeRunner:
        if answer is None:
            answer = result((), rc, stdout, stderr)
        self.rules.append(Rule(matcher, answer, times))
        return self

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        timeout: float = 300,
        check: bool = True,
        progress: str | None = None,
    ) -> Result:
        call = Call(
            tuple(argv),
            input=input,
            env=dict(env) if env is not None else None,
            user=user,
            cwd=cwd,
            timeout=timeout,
            check=check,
            progress=progress,
        )
        self.calls.append(call)
        answer: Answer = result()
        for rule in self.rules:
            if rule.matches(call):
                rule.used += 1
                answer = rule.answer
                break
        res = answer(call) if callable(answer) else answer
        res = Result(call.argv, res.returncode, res.stdout, res.stderr, res.seconds)
        if check and not res.ok:
            raise CommandFailed(res)
        return res

    def which(self, program: str) -> str | None:
        return None if program in self.missing_programs else f"/usr/bin/{program}"

    def ran(self, prefix: Sequence[str]) -> list[Call]:
        return [c for c in self.calls if c.startswith(prefix)]

    def ran_program(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.program == name]


# --- Context ----------------------------------------------------------------------------------


def make_ctx(
    tmp_path: Path,
    config: Config,
    runner: Any,
    check: bool = False,
    systemd: bool = True,
    os_release: OsRelease = DEBIAN_12,
) -> Context:
    """A Context whose files live under tmp_path and whose commands go to `runner`."""
    return Context(
        config=config,
        runner=runner,
        files=Files(root=tmp_path, chown=False, check=check),
        os=os_release,
        systemd=systemd,
        check=check,
    )


@pytest.fixture
def fake_runner() -> FakeRunner:
    return FakeRunner()


# --- golden files -----------------------------------------------------------------------------


def assert_golden(name: str, text: str) -> None:
    """Compare with tests/unit/golden/<name>; UPDATE_GOLDEN=1 rewrites the file instead."""
    path = GOLDEN_DIR / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    if not path.exists():
        pytest.fail(f"golden file {path} is missing; run with UPDATE_GOLDEN=1 to create it")
    expected = path.read_text(encoding="utf-8")
    assert text == expected, f"{name} differs from its golden file (UPDATE_GOLDEN=1 updates it)"


# --- logging ----------------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo agent.core.log.configure(): structlog defaults back, the agent log file closed."""
    import structlog

    from agent.core import log

    yield
    if log.agent_log.stream is not None:
        log.agent_log.stream.close()
    log.agent_log.stream = None
    structlog.reset_defaults()


# --- uv (agent/host/uv.py) --------------------------------------------------------------------


@pytest.fixture(autouse=True)
def uv_already_fetched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests never reach PyPI: the locked uv binary counts as fetched, and any download
    is refused. tests/unit/test_uv_fetch.py tests the fetch itself."""
    from agent.host import uv

    def no_network(url: str, accept: str | None = None) -> bytes:
        raise AssertionError(f"a unit test tried to download {url}")

    monkeypatch.setattr(uv, "_get", no_network)
    monkeypatch.setattr(uv, "_present", lambda ctx, path: True)


def uv_binary() -> str:
    """Where the locked uv is on a host: argv[0] of every uv command."""
    from agent.host import uv

    return str(uv.binary_path(uv.shipped_pin()))


def uv_venv(call: Call) -> bool:
    """Matcher: `uv venv ...`."""
    return call.argv[:2] == (uv_binary(), "venv")


def uv_pip(command: str) -> Callable[[Call], bool]:
    """Matcher: `uv pip <command> ...` (install, uninstall)."""
    return lambda call: call.argv[:3] == (uv_binary(), "pip", command)
