"""The venv devpi runs from: the system python3, the pinned devpi packages, bytecode compiled.

uv (host/uv.py, itself hash-pinned) makes the venv and installs the lock. Root owns the venv, so
the service user cannot change the code it runs. The venv step converges it; an export/import
upgrade builds the new one with the same code.
"""

from __future__ import annotations

import re
from pathlib import Path

from agent.core.context import Context, StepFailed
from agent.core.crashpoint import crashpoint
from agent.core.devpilock import Pin, normalise, parse_lock, shipped_lock
from agent.core.paths import DEVPI_RESTART, UPGRADE_RECORD, VENV_BUILD
from agent.core.runner import CommandFailed
from agent.host.uv import ensure_uv, uv_env

SYSTEM_PYTHON = "/usr/bin/python3"
# In the venv: the lock it was built from (a different lock is a venv change), and the
# requirement files uv installs from.
VENV_LOCK = "devpi-agent.lock"
_INSTALL_DIR = ".devpi-agent-install"
# Builds of the lock's sdists write these timestamps, so every host gets the same bytes.
SOURCE_DATE_EPOCH = "315532800"
# What a venv holds that no lock names: pip, in venvs an older agent made with python3 -m venv.
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


def wanted_lock(ctx: Context) -> str | None:
    """The lock the venv is built from; None with devpi.unlocked = true."""
    devpi = ctx.config.devpi
    if devpi.unlocked:
        return None
    return devpi.lock if devpi.lock is not None else shipped_lock()


def source_of(ctx: Context) -> str:
    return str(ctx.config.devpi.lock_file or "the lock shipped in the agent")


def builds_beside_earlier_steps(ctx: Context) -> bool:
    """True for a first build: the venv, and what needs only it (the service user, devpi's
    config and devpi-init), can be made while apt works (core/engine.py's early steps).

    Only a venv that does not exist yet: an existing one may be moved aside by an export/import
    upgrade, which must run first (so must the undo of an upgrade that was cut short).
    """
    if ctx.files.exists(ctx.config.devpi.venv / "bin" / "python"):
        return False
    # uv needs nothing apt installs: only the system python3 and the network.
    return not (ctx.files.exists(UPGRADE_RECORD) or ctx.is_pending(VENV_BUILD))


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
            # --clear empties a venv (it has a pyvenv.cfg); uv refuses a directory that is not one.
            clear = ["--clear"] if ctx.files.exists(venv / "pyvenv.cfg") else []
            ctx.runner.run(
                [
                    str(ensure_uv(ctx)),
                    "venv",
                    "--quiet",
                    "--no-project",
                    "--python",
                    SYSTEM_PYTHON,
                    *clear,
                    str(venv),
                ],
                env=uv_env(),
                cwd="/",
                timeout=300,
            )
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
        # Fetched only when there is work for it: a no-op never downloads.
        uv = ensure_uv(ctx)
        _install_locked(ctx, uv, python, locked)
        _remove_unlocked(ctx, uv, python, locked)
        still = missing_pins(ctx)
        if still:
            raise StepFailed(f"uv finished but {' '.join(still)} is not installed")
        ctx.mark_pending(DEVPI_RESTART)
    # In plan: the lock's diff against the one the venv was built from.
    ctx.write(record, lock, mode=0o644)
    ctx.clear_pending(VENV_BUILD)


def _uv_pip(ctx: Context, uv: Path, python: Path, args: list[str], label: str) -> None:
    command, *rest = args
    ctx.runner.run(
        [str(uv), "pip", command, "--python", str(python), *rest],
        env={**uv_env(), "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH},
        # Not the operator's working directory: a uv.toml or pyproject.toml there is no
        # setting for devpi's venv (/etc/uv/uv.toml still is).
        cwd="/",
        timeout=1800,
        progress=label,
    )


def _install_locked(ctx: Context, uv: Path, python: Path, locked: tuple[Pin, ...]) -> None:
    """Every wheel in one uv run (hashes required, nothing resolved), then the sdist-only ones.

    uv downloads and checks every wheel before it installs any, so a mismatch fails here with
    the venv as it was. The sdists build without isolation against the locked setuptools just
    installed. Bytecode is compiled (devpi then starts in 4-10 s instead of 9-15 s, and the
    root-owned venv never needs the service user to write); files are copied out of uv's
    cache, not hard-linked, so nothing done to the cache reaches the venv.
    """
    staging = ctx.config.devpi.venv / _INSTALL_DIR
    ctx.files.ensure_dir(staging, mode=0o700, record=False)
    batches = [
        ("wheels.txt", [p for p in locked if not p.sdist_only], ["--only-binary", ":all:"]),
        (
            "sdists.txt",
            [p for p in locked if p.sdist_only],
            ["--no-build-isolation"],
        ),
    ]
    common = [
        "install",
        "--require-hashes",
        "--no-deps",
        "--compile-bytecode",
        "--link-mode",
        "copy",
    ]
    for name, pins, options in batches:
        if not pins:
            continue
        requirements = staging / name
        text = "".join(f"{pin.text}\n" for pin in pins)
        ctx.files.ensure_file(requirements, text, mode=0o600, record=False)
        try:
            _uv_pip(
                ctx,
                uv,
                python,
                [*common, *options, "-r", str(requirements)],
                # The crash tests' points name these labels.
                "uv pip install" if name == "wheels.txt" else "uv pip install (sdists)",
            )
        except CommandFailed as error:
            output = error.result.stderr + error.result.stdout
            if "Hash mismatch for" in output:
                raise StepFailed(
                    "a downloaded package does not match its sha256 hash in the lock "
                    f"({source_of(ctx)}): nothing was installed, the venv and the running "
                    f"devpi are as they were\n{error.result.tail(25)}"
                ) from None
            raise
    ctx.files.remove(staging / "wheels.txt", record=False)
    ctx.files.remove(staging / "sdists.txt", record=False)


def _remove_unlocked(ctx: Context, uv: Path, python: Path, locked: tuple[Pin, ...]) -> None:
    """Packages an older lock (or an unlocked build) left that this lock no longer names."""
    venv = ctx.files.host_path(ctx.config.devpi.venv)
    have = installed_versions(sorted(venv.glob("lib/python3*/site-packages")))
    names = {pin.name for pin in locked} | _NOT_LOCKED
    extra = sorted(name for name in have if normalise(name) not in names)
    if extra:
        _uv_pip(ctx, uv, python, ["uninstall", *extra], "uv pip uninstall")


def _install_unlocked(ctx: Context, python: Path) -> None:
    pins = missing_pins(ctx)
    if not pins:
        ctx.clear_pending(VENV_BUILD)
        return
    if ctx.change(f"uv pip install {' '.join(pins)}"):
        ctx.mark_pending(VENV_BUILD)
        # No longer what any lock built: a lock later is a reinstall.
        ctx.files.remove(ctx.config.devpi.venv / VENV_LOCK, record=False)
        _uv_pip(
            ctx,
            ensure_uv(ctx),
            python,
            [
                "install",
                "--compile-bytecode",
                "--link-mode",
                "copy",
                *ctx.config.devpi.requirements,
            ],
            "uv pip install",
        )
        still = missing_pins(ctx)
        if still:
            raise StepFailed(f"uv finished but {' '.join(still)} is not installed")
        ctx.mark_pending(DEVPI_RESTART)
        ctx.clear_pending(VENV_BUILD)
