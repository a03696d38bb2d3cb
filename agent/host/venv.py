"""The venv devpi runs from: the system python3, the pinned devpi packages, bytecode compiled.

Root owns the venv, so the service user cannot change the code it runs. The venv step converges
it; an export/import upgrade builds the new one with the same code.
"""

from __future__ import annotations

import re
from pathlib import Path

from agent.core.context import Context, StepFailed
from agent.core.crashpoint import crashpoint
from agent.core.paths import DEVPI_RESTART, SYSTEM_CA_BUNDLE, VENV_BUILD

SYSTEM_PYTHON = "/usr/bin/python3"
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


def ensure_venv(ctx: Context) -> None:
    """The venv at devpi.venv with exactly the pinned packages; rebuilt after a killed build."""
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
    pins = missing_pins(ctx)
    if not pins:
        ctx.clear_pending(VENV_BUILD)
        return
    if ctx.change(f"pip install {' '.join(pins)}"):
        ctx.mark_pending(VENV_BUILD)
        ctx.runner.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--no-input",
                "--progress-bar",
                "off",
                *ctx.config.devpi.requirements,
            ],
            env=pip_env(),
            timeout=1800,
            progress="pip install",
            # pip compiles bytecode by default (no --no-compile): devpi then starts in 4-10 s
            # instead of 9-15 s, and the root-owned venv never needs the service user to write.
        )
        still = missing_pins(ctx)
        if still:
            raise StepFailed(f"pip finished but {' '.join(still)} is not installed")
        ctx.mark_pending(DEVPI_RESTART)
        ctx.clear_pending(VENV_BUILD)
