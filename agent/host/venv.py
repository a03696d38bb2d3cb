"""The venv devpi runs from: the system python3, the pinned devpi packages, bytecode compiled.

Root owns the venv, so the service user cannot change the code it runs. The venv step converges
it; an export/import upgrade builds the new one with the same code.
"""

from __future__ import annotations

import re
from pathlib import Path

from agent.core.context import Context, StepFailed
from agent.core.crashpoint import crashpoint
from agent.core.devpilock import Pin, normalise, parse_lock, shipped_lock
from agent.core.paths import DEVPI_RESTART, SYSTEM_CA_BUNDLE, UPGRADE_RECORD, VENV_BUILD
from agent.core.runner import CommandFailed
from agent.facts.system import installed_packages

SYSTEM_PYTHON = "/usr/bin/python3"
# In the venv: the lock it was built from (a different lock is a venv change), and the
# requirement files pip installs from.
VENV_LOCK = "devpi-agent.lock"
_INSTALL_DIR = ".devpi-agent-install"
# Builds of the lock's sdists write these timestamps, so every host gets the same bytes.
SOURCE_DATE_EPOCH = "315532800"
# What a venv holds that no lock names: pip itself (python3 -m venv installs it).
_NOT_LOCKED = frozenset({"pip"})
_DIST_INFO = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[^-]+)\.dist-info$")


def installed_versions(site_packages: list[Path]) -> dict[str, str]:
    """Normalised distribution name -> version, read from the dist-info directory names."""
    versions: dict[str, str] = {}
    for directory in site_packages:
        for entry in directory.glob("*.dist-info"):
            match = _DIST_INFO.match(entry.name)
            if match:
                name = re.sub(r"[-_.]+", "-", match["name"]).lower()
                versions[name] = match["version"]
    return versions


def wanted_versions(ctx: Context) -> dict[str, str]:
    return dict(req.split("==", 1) for req in ctx.config.devpi.requirements)


def missing_pins(ctx: Context) -> list[str]:
    venv = ctx.files.host_path(ctx.config.devpi.venv)
    have = installed_versions(sorted(venv.glob("lib/python3*/site-packages")))
    return [
        f"{name}=={version}"
        for name, version in wanted_versions(ctx).items()
        if have.get(name) != version
    ]


def pip_env() -> dict[str, str]:
    env = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    # The OS trust store, so a company CA added with update-ca-certificates (TLS-inspecting
    # proxies) works for pip as it does for apt; pip's bundled certifi would not know it.
    if SYSTEM_CA_BUNDLE.exists():
        env["PIP_CERT"] = str(SYSTEM_CA_BUNDLE)
    return env


def wanted_lock(ctx: Context) -> str | None:
    """The lock the venv is built from; None with devpi.unlocked = true."""
    devpi = ctx.config.devpi
    if devpi.unlocked:
        return None
    return devpi.lock if devpi.lock is not None else shipped_lock()


def source_of(ctx: Context) -> str:
    return str(ctx.config.devpi.lock_file or "the lock shipped in the agent")


def builds_beside_earlier_steps(ctx: Context) -> bool:
    """True for a first build whose installer is already on the host.

    Only a venv that does not exist yet: an existing one may be moved aside by an export/import
    upgrade, which must run first (so must the undo of an upgrade that was cut short).
    """
    if ctx.files.exists(ctx.config.devpi.venv / "bin" / "python"):
        return False
    if ctx.files.exists(UPGRADE_RECORD) or ctx.is_pending(VENV_BUILD):
        return False
    # python3 -m venv needs python3-venv, which the apt step installs.
    return "python3-venv" in installed_packages(ctx.runner, ["python3-venv"])


def ensure_venv(ctx: Context) -> None:
    """The venv at devpi.venv with exactly the locked packages; rebuilt after a killed build."""
    venv = ctx.config.devpi.venv
    python = venv / "bin" / "python"
    # A run killed while it built the venv leaves it in an unknown state (pip without its own
    # files, a package half unpacked but with its dist-info): the next run builds it again.
    interrupted = ctx.is_pending(VENV_BUILD)
    if interrupted or not ctx.files.exists(python):
        again = " again (the last build was cut short)" if interrupted else ""
        if ctx.change(f"create venv {venv}{again}"):
            ctx.mark_pending(VENV_BUILD)
            ctx.files.ensure_parent(venv, mode=0o755)
            # --clear empties a venv (it has a pyvenv.cfg), never a directory that is not one.
            clear = ["--clear"] if ctx.files.exists(venv / "pyvenv.cfg") else []
            ctx.runner.run([SYSTEM_PYTHON, "-m", "venv", *clear, str(venv)], timeout=300)
            if not ctx.files.exists(python):
                raise StepFailed(f"python3 -m venv did not create {python}")
            crashpoint("venv:created")
    lock = wanted_lock(ctx)
    if lock is None:
        ctx.log.warning(
            "devpi.unlocked = true: devpi's dependencies are resolved from the index at apply "
            "time, unpinned and unhashed; set devpi.lock_file to pin them"
        )
        _install_unlocked(ctx, python)
        return
    record = venv / VENV_LOCK
    pins = missing_pins(ctx)
    if not interrupted and not pins and ctx.files.read(record) == lock:
        ctx.clear_pending(VENV_BUILD)
        return
    locked = parse_lock(lock)
    if ctx.change(f"install {len(locked)} locked packages from {source_of(ctx)} ({record})"):
        ctx.mark_pending(VENV_BUILD)
        _install_locked(ctx, python, locked)
        _remove_unlocked(ctx, python, locked)
        still = missing_pins(ctx)
        if still:
            raise StepFailed(f"pip finished but {' '.join(still)} is not installed")
        ctx.mark_pending(DEVPI_RESTART)
    # In plan: the lock's diff against the one the venv was built from.
    ctx.write(record, lock, mode=0o644)
    ctx.clear_pending(VENV_BUILD)


def _pip(ctx: Context, python: Path, args: list[str], label: str) -> None:
    ctx.runner.run(
        [str(python), "-m", "pip", *args],
        env={**pip_env(), "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH},
        timeout=1800,
        progress=label,
        # pip compiles bytecode by default (no --no-compile): devpi then starts in 4-10 s
        # instead of 9-15 s, and the root-owned venv never needs the service user to write.
    )


def _install_locked(ctx: Context, python: Path, locked: tuple[Pin, ...]) -> None:
    """Every wheel in one pip run (hashes required, nothing resolved), then the sdist-only ones.

    pip checks every hash before it installs anything, so a mismatch fails here with the venv
    as it was. The sdists build without isolation against the locked setuptools just installed.
    """
    staging = ctx.config.devpi.venv / _INSTALL_DIR
    ctx.files.ensure_dir(staging, mode=0o700, record=False)
    batches = [
        ("wheels.txt", [p for p in locked if not p.sdist_only], ["--only-binary", ":all:"]),
        (
            "sdists.txt",
            [p for p in locked if p.sdist_only],
            ["--no-build-isolation", "--use-pep517"],
        ),
    ]
    common = ["install", "--no-input", "--progress-bar", "off", "--require-hashes", "--no-deps"]
    for name, pins, options in batches:
        if not pins:
            continue
        requirements = staging / name
        text = "".join(f"{pin.text}\n" for pin in pins)
        ctx.files.ensure_file(requirements, text, mode=0o600, record=False)
        try:
            _pip(
                ctx,
                python,
                [*common, *options, "-r", str(requirements)],
                # The wheels' run keeps the plain label: the crash tests' points name it.
                "pip install" if name == "wheels.txt" else "pip install (sdists)",
            )
        except CommandFailed as error:
            output = error.result.stderr + error.result.stdout
            if "DO NOT MATCH THE HASHES" in output:
                raise StepFailed(
                    "a downloaded package does not match its sha256 hash in the lock "
                    f"({source_of(ctx)}): nothing was installed, the venv and the running "
                    f"devpi are as they were\n{error.result.tail(25)}"
                ) from None
            raise
    ctx.files.remove(staging / "wheels.txt", record=False)
    ctx.files.remove(staging / "sdists.txt", record=False)


def _remove_unlocked(ctx: Context, python: Path, locked: tuple[Pin, ...]) -> None:
    """Packages an older lock (or an unlocked build) left that this lock no longer names."""
    venv = ctx.files.host_path(ctx.config.devpi.venv)
    have = installed_versions(sorted(venv.glob("lib/python3*/site-packages")))
    names = {pin.name for pin in locked} | _NOT_LOCKED
    extra = sorted(name for name in have if normalise(name) not in names)
    if extra:
        _pip(ctx, python, ["uninstall", "--yes", *extra], "pip uninstall")


def _install_unlocked(ctx: Context, python: Path) -> None:
    pins = missing_pins(ctx)
    if not pins:
        ctx.clear_pending(VENV_BUILD)
        return
    if ctx.change(f"pip install {' '.join(pins)}"):
        ctx.mark_pending(VENV_BUILD)
        # No longer what any lock built: a lock later is a reinstall.
        ctx.files.remove(ctx.config.devpi.venv / VENV_LOCK, record=False)
        _pip(
            ctx,
            python,
            ["install", "--no-input", "--progress-bar", "off", *ctx.config.devpi.requirements],
            "pip install",
        )
        still = missing_pins(ctx)
        if still:
            raise StepFailed(f"pip finished but {' '.join(still)} is not installed")
        ctx.mark_pending(DEVPI_RESTART)
        ctx.clear_pending(VENV_BUILD)
