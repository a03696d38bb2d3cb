"""devpi's lock: parsing, the config's choice of lock, and the venv step's decisions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Call, FakeRunner, make_ctx, reference_data, result, uv_binary, uv_pip

from agent.core.config import Config, ConfigError, parse
from agent.core.context import StepFailed
from agent.core.devpilock import LockError, parse_lock, shipped_lock, versions_of
from agent.host import venv as host_venv
from agent.steps import venv

VENV = Path("/opt/devpi-agent/venv")
ONE_PIN = "idna==3.20 \\\n    --hash=sha256:" + "a" * 64 + "\n"


def config(**devpi: Any) -> Config:
    data = reference_data()
    data["devpi"] = {**data.get("devpi", {}), **devpi}
    return parse(data)


def refusal(**devpi: Any) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        config(**devpi)
    return caught.value


# --- the lock ---------------------------------------------------------------------------------


def test_the_shipped_lock_pins_the_default_versions_for_every_python_and_arch() -> None:
    pins = parse_lock(shipped_lock())
    defaults = config().devpi
    assert versions_of(pins, "devpi-server") == {defaults.server_version}
    assert versions_of(pins, "devpi-web") == {defaults.web_version}
    assert versions_of(pins, "devpi-client") == {defaults.client_version}
    # setuptools stays below 81: Pyramid imports pkg_resources.
    [setuptools] = versions_of(pins, "setuptools")
    assert int(setuptools.split(".")[0]) < 81
    assert all(pin.hashes for pin in pins)
    # Universal: one lock for 3.10-3.13, so markers choose between versions, and compiled
    # packages carry the hashes of many wheels (both arches, every CPython).
    assert any(pin.marker and "python_full_version" in pin.marker for pin in pins)
    [cffi] = [pin for pin in pins if pin.name == "cffi"]
    assert len(cffi.hashes) > 20


def test_a_lock_is_parsed_with_markers_and_continuations() -> None:
    text = (
        "# a comment\n"
        "Zope.Interface==8.6 ; python_full_version < '3.11' \\\n"
        f"    --hash=sha256:{'b' * 64} \\\n"
        f"    --hash=sha256:{'c' * 64}\n" + ONE_PIN
    )
    zope, idna = parse_lock(text)
    assert (zope.name, zope.version, zope.marker) == (
        "zope-interface",
        "8.6",
        "python_full_version < '3.11'",
    )
    assert zope.hashes == ("b" * 64, "c" * 64)
    assert (idna.name, idna.version, idna.marker) == ("idna", "3.20", None)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("idna>=3.0 \\\n    --hash=sha256:" + "a" * 64 + "\n", "is not name==version"),
        ("idna==3.20\n", "has no sha256 hash"),
        ("idna==3.20 --hash=md5:abc\n", "is not a --hash=sha256"),
        ("idna==3.20 --hash=sha256:abc\n", "is not a --hash=sha256"),
        ("-e git+https://example.com/x\n", "is not name==version"),
        ("# nothing\n", "holds no requirement"),
    ],
)
def test_a_lock_that_pins_loosely_is_refused(text: str, says: str) -> None:
    with pytest.raises(LockError, match=says):
        parse_lock(text)


# --- the config -------------------------------------------------------------------------------


def test_the_default_config_uses_the_shipped_lock() -> None:
    devpi = config().devpi
    assert (devpi.lock_file, devpi.lock, devpi.unlocked) == (None, None, False)


def test_a_version_outside_the_shipped_lock_names_the_key_and_the_ways_out() -> None:
    error = refusal(web_version="5.0.0")
    assert error.key == "devpi.web_version"
    assert "devpi.lock_file" in error.message and "devpi.unlocked = true" in error.message


def test_unlocked_accepts_any_version() -> None:
    devpi = config(server_version="6.21.0", unlocked=True).devpi
    assert devpi.unlocked and devpi.lock is None


def test_a_users_lock_is_read_and_must_hold_the_versions(tmp_path: Path) -> None:
    own = tmp_path / "devpi.lock"
    own.write_text(shipped_lock().replace("devpi-web==5.1.1", "devpi-web==5.0.0"))
    devpi = config(web_version="5.0.0", lock_file=str(own)).devpi
    assert devpi.lock == own.read_text() and devpi.lock_file == own
    error = refusal(lock_file=str(own))  # web_version 5.1.1 is not in it
    assert error.key == "devpi.lock_file" and "devpi-web 5.1.1" in error.message


def test_a_users_lock_without_hashes_is_refused(tmp_path: Path) -> None:
    own = tmp_path / "devpi.lock"
    own.write_text("devpi-server==6.20.3\n")
    error = refusal(lock_file=str(own))
    assert error.key == "devpi.lock_file" and "no sha256 hash" in error.message


def test_lock_file_and_unlocked_exclude_each_other(tmp_path: Path) -> None:
    own = tmp_path / "devpi.lock"
    own.write_text(shipped_lock())
    assert refusal(lock_file=str(own), unlocked=True).key == "devpi.lock_file"


def test_a_missing_lock_file_names_the_key(tmp_path: Path) -> None:
    error = refusal(lock_file=str(tmp_path / "nope.lock"))
    assert error.key == "devpi.lock_file" and "does not exist" in error.message


# --- the venv step ----------------------------------------------------------------------------


def site(root: Path) -> Path:
    return root / str(VENV).lstrip("/") / "lib/python3.11/site-packages"


def built_venv(root: Path, lock: str | None, extra: tuple[str, ...] = ()) -> None:
    (root / str(VENV).lstrip("/") / "bin").mkdir(parents=True)
    (root / str(VENV).lstrip("/") / "bin/python").write_text("")
    site(root).mkdir(parents=True)
    for dist in ("devpi_server-6.20.3", "devpi_web-5.1.1", "devpi_client-7.3.0", "pip-24.0"):
        (site(root) / f"{dist}.dist-info").mkdir()
    for dist in extra:
        (site(root) / f"{dist}.dist-info").mkdir()
    if lock is not None:
        (root / str(VENV).lstrip("/") / host_venv.VENV_LOCK).write_text(lock)


def uv_pip_calls(runner: FakeRunner) -> list[tuple[str, ...]]:
    """Each `uv pip` command's words after `--python <venv python>`: (command, *options)."""
    calls = [c.argv for c in runner.calls if c.argv[:2] == (uv_binary(), "pip")]
    for argv in calls:
        assert argv[3:5] == ("--python", str(VENV / "bin/python")), argv
    return [(argv[2], *argv[5:]) for argv in calls]


def test_a_venv_built_from_this_lock_is_left_alone(tmp_path: Path) -> None:
    built_venv(tmp_path, shipped_lock())
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, config(), runner)
    venv.converge(ctx)
    assert (runner.calls, ctx.changes) == ([], [])


def test_a_different_lock_reinstalls_removes_what_it_dropped_and_restarts(tmp_path: Path) -> None:
    built_venv(tmp_path, "old lock\n", extra=("Leftover_Pkg-1.0",))
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, config(), runner)
    venv.converge(ctx)
    wheels, sdists, uninstall = uv_pip_calls(runner)
    assert wheels[0] == "install" and "--only-binary" in wheels
    assert sdists[0] == "install" and "--no-build-isolation" in sdists
    assert uninstall == ("uninstall", "leftover-pkg")  # never pip itself
    assert {"--require-hashes", "--no-deps", "--compile-bytecode"} <= set(wheels) & set(sdists)
    assert all(c.env and c.env["SOURCE_DATE_EPOCH"] for c in runner.calls)
    assert ctx.is_pending("devpi-server-restart") and not ctx.is_pending("venv-build")
    record = tmp_path / str(VENV).lstrip("/") / host_venv.VENV_LOCK
    assert record.read_text() == shipped_lock()
    # What uv read: every pin with its hashes, pyramid-chameleon alone in the sdist run.
    staged = tmp_path / str(VENV).lstrip("/") / ".devpi-agent-install"
    assert not list(staged.iterdir())


def test_plan_shows_the_locks_diff_and_changes_nothing(tmp_path: Path) -> None:
    old = shipped_lock().replace("idna==3.20", "idna==3.10")
    built_venv(tmp_path, old)
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, config(), runner, check=True)
    venv.converge(ctx)
    assert runner.calls == []
    [change] = ctx.files.changes
    assert "-idna==3.10" in change.diff and "+idna==3.20" in change.diff
    record = tmp_path / str(VENV).lstrip("/") / host_venv.VENV_LOCK
    assert record.read_text() == old


def test_a_hash_mismatch_fails_the_step_and_leaves_the_venv(tmp_path: Path) -> None:
    old = "old lock\n"
    built_venv(tmp_path, old)
    # uv 0.13.9's words, from a run with a tampered lock (nothing was installed).
    mismatch = (
        "error: Failed to download `idna==3.10`\n"
        "  cause: Hash mismatch for `idna==3.10`\n\n"
        "         Expected:\n"
        f"           sha256:{'0' * 64}\n\n"
        "         Computed:\n"
        "           sha256:946d195a0d259cbba61165e88e65941f16e9b36ea6ddb97f00452bae8b1287d3\n"
    )

    def fails(call: Call) -> Any:
        return result(call.argv, rc=1, stderr=mismatch)

    runner = FakeRunner().on(uv_pip("install"), fails)
    ctx = make_ctx(tmp_path, config(), runner)
    with pytest.raises(StepFailed, match="does not match its sha256 hash") as caught:
        venv.converge(ctx)
    assert "idna==3.10" in str(caught.value)
    assert len(runner.calls) == 1  # nothing after the failed wheels run
    assert not ctx.is_pending("devpi-server-restart")
    record = tmp_path / str(VENV).lstrip("/") / host_venv.VENV_LOCK
    assert record.read_text() == old


def test_unlocked_resolves_as_before_and_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    built_venv(tmp_path, None)
    for old in site(tmp_path).glob("devpi_web-*"):
        old.rmdir()
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, config(unlocked=True), runner)
    with pytest.raises(StepFailed, match=r"devpi-web==5\.1\.1 is not installed"):
        venv.converge(ctx)
    [install] = uv_pip_calls(runner)
    assert install[-3:] == ("devpi-server==6.20.3", "devpi-web==5.1.1", "devpi-client==7.3.0")
    assert "--require-hashes" not in install
    assert "devpi.unlocked = true" in capsys.readouterr().out


def test_the_shipped_lock_is_compiled_from_devpi_requirements_in() -> None:
    """devpi-requirements.in edited without `make lock-devpi` fails here."""
    pins = parse_lock(shipped_lock())
    wanted = Path(__file__).resolve().parents[2] / "devpi-requirements.in"
    for line in wanted.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==")
            assert versions_of(pins, name) == {version}, line
