"""The cached base rootfs of the nspawn test hosts: a Debian minbase made with mmdebstrap,
customised once, keyed on everything that goes into it.

``DEVPI_AGENT_TEST_CACHE`` names the cache dir (default ``/var/cache/devpi-agent-tests``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from hostprocs import HostError, safe_rmtree, tail, tool

#: The Debian releases a test host can be: bookworm (Python 3.11, a venv with setuptools) and
#: trixie (Python 3.13, a venv without, as on Ubuntu 24.04).
SUITES: tuple[str, ...] = ("bookworm", "trixie")
SUITE = "bookworm"
#: Debian architectures a test rootfs can be; a foreign one (arm64) runs through qemu-user-static
#: and binfmt_misc (see ``binfmt_problems``).
ARCHES: tuple[str, ...] = ("amd64", "arm64")
ARCH = "amd64"
#: The binfmt_misc entry (qemu-user-static, update-binfmts) and emulator of a foreign arch.
BINFMT: dict[str, str] = {"arm64": "qemu-aarch64"}
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")

#: Packages baked into the base rootfs.  Do NOT add what the product installs itself
#: (supervisor, caddy, python3-venv, ...): the tests must see it install them.
PACKAGES: tuple[str, ...] = ("systemd-sysv", "dbus", "ca-certificates", "python3")


def mirrors(suite: str) -> tuple[str, ...]:
    """The same mirror as the machine's own apt configuration (deb.debian.org, security too)."""
    return (
        f"deb http://deb.debian.org/debian {suite} main",
        f"deb http://deb.debian.org/debian {suite}-updates main",
        f"deb http://deb.debian.org/debian-security {suite}-security main",
    )


MIRRORS = mirrors(SUITE)

HOST_CA_DIR = Path("/usr/local/share/ca-certificates")

DEFAULT_CACHE_DIR = Path("/var/cache/devpi-agent-tests")

#: PATH used for every command run inside a host (plus HOME=/root, plus caller's env).
INNER_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

#: Timers that would start apt/dpkg behind the tests' back (dpkg lock contention).
MASKED_UNITS: tuple[str, ...] = (
    "apt-daily.timer",
    "apt-daily.service",
    "apt-daily-upgrade.timer",
    "apt-daily-upgrade.service",
)

ETC_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"

BASE_HOSTNAME = "devpi-test"

#: Bump when the post-mmdebstrap customisation changes (it is part of the cache key).
RECIPE_VERSION = 1


def default_suite() -> str:
    """DEVPI_AGENT_TEST_SUITE, for a whole run on another release (default bookworm)."""
    suite = os.environ.get("DEVPI_AGENT_TEST_SUITE") or SUITE
    if suite not in SUITES:
        raise HostError(f"DEVPI_AGENT_TEST_SUITE={suite!r}: not one of {', '.join(SUITES)}")
    return suite


def default_cache_dir() -> Path:
    return Path(os.environ.get("DEVPI_AGENT_TEST_CACHE") or DEFAULT_CACHE_DIR)


def _host_ca_certs() -> list[tuple[str, bytes]]:
    if not HOST_CA_DIR.is_dir():
        return []
    return sorted(
        (str(p.relative_to(HOST_CA_DIR)), p.read_bytes())
        for p in HOST_CA_DIR.rglob("*.crt")
        if p.is_file()
    )


def _mmdebstrap_argv(target: Path | None, suite: str = SUITE, arch: str = ARCH) -> list[str]:
    return [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        # Only a foreign arch is named: the amd64 command line (and so its key) stays as it was.
        *([f"--architectures={arch}"] if arch != ARCH else []),
        "--include=" + ",".join(PACKAGES),
        suite,
        str(target) if target is not None else "<TARGET>",
        *mirrors(suite),
    ]


def binfmt_problems(arch: str) -> list[str]:
    """What stops this machine from running `arch` binaries (empty: nothing).

    Needs binfmt_misc mounted (``mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc``)
    and qemu-user-static's entry enabled with the F flag (``update-binfmts --enable
    qemu-aarch64``), so that the emulator works inside a chroot or container.
    """
    if arch == ARCH:
        return []
    entry = BINFMT_DIR / BINFMT[arch]
    if not (BINFMT_DIR / "status").exists():
        return [
            f"binfmt_misc is not mounted at {BINFMT_DIR} "
            f"(mount -t binfmt_misc binfmt_misc {BINFMT_DIR})"
        ]
    try:
        text = entry.read_text()
    except OSError:
        return [
            f"no binfmt entry {entry} for {arch} "
            "(apt-get install qemu-user-static binfmt-support; "
            f"update-binfmts --enable {BINFMT[arch]})"
        ]
    lines = text.splitlines()
    flags = next((line.split(":", 1)[1] for line in lines if line.startswith("flags:")), "")
    problems = []
    if "enabled" not in lines:
        problems.append(f"{entry} is disabled (update-binfmts --enable {BINFMT[arch]})")
    if "F" not in flags:
        problems.append(f"{entry} lacks the F flag: the emulator would not be found in a container")
    return problems


def ensure_binfmt(arch: str) -> list[str]:
    """Mount binfmt_misc and enable `arch`'s qemu-user-static entry if they are not yet (root),
    then what still stops it (empty: nothing)."""
    if arch == ARCH or not binfmt_problems(arch):
        return []
    env = {"PATH": INNER_PATH}
    if not (BINFMT_DIR / "status").exists():
        subprocess.run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
            env=env,
            capture_output=True,
            check=False,
            timeout=30,
        )
    if not (BINFMT_DIR / BINFMT[arch]).exists() or binfmt_problems(arch):
        subprocess.run(
            ["update-binfmts", "--enable", BINFMT[arch]],
            env=env,
            capture_output=True,
            check=False,
            timeout=60,
        )
    return binfmt_problems(arch)


def rootfs_key(
    ca_certs: Sequence[tuple[str, bytes]] | None = None, suite: str = SUITE, arch: str = ARCH
) -> str:
    """Cache key: hash of everything that goes into the base rootfs."""
    certs = _host_ca_certs() if ca_certs is None else ca_certs
    h = hashlib.sha256()
    recipe = {
        "recipe": RECIPE_VERSION,
        "argv": _mmdebstrap_argv(None, suite, arch),
        "suite": suite,
        "packages": list(PACKAGES),
        "mirrors": list(mirrors(suite)),
        "hosts": ETC_HOSTS,
        "hostname": BASE_HOSTNAME,
        "masked": list(MASKED_UNITS),
    }
    h.update(json.dumps(recipe, sort_keys=True).encode())
    for name, data in certs:
        h.update(b"\0cert\0" + name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()[:16]


def _customize_rootfs(root: Path, ca_certs: Sequence[tuple[str, bytes]]) -> None:
    (root / "etc/hosts").write_text(ETC_HOSTS)
    (root / "etc/hostname").write_text(BASE_HOSTNAME + "\n")
    # An empty /etc/machine-id (mmdebstrap's default) makes every boot generate
    # a fresh one, so copies do not share an id.
    (root / "etc/machine-id").write_text("")
    for unit in MASKED_UNITS:
        link = root / "etc/systemd/system" / unit
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
    ca_dir = root / HOST_CA_DIR.relative_to("/")
    for name, data in ca_certs:
        dest = ca_dir / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        dest.chmod(0o644)
    if ca_certs:
        subprocess.run(
            [tool("chroot"), str(root), "update-ca-certificates"],
            env={"PATH": INNER_PATH, "LANG": "C.UTF-8"},
            check=True,
            capture_output=True,
            timeout=300,
        )


def build_rootfs(
    cache_dir: Path | None = None,
    *,
    suite: str | None = None,
    arch: str = ARCH,
    timeout: float = 1800,
) -> Path:
    """Return the cached base rootfs directory, building it first if needed.

    The directory is ``<cache_dir>/rootfs-<key>`` where the key hashes the
    mmdebstrap command line, package list, suite, mirrors, the customisation and
    the host CA certificates baked in.  Building happens in a temp dir next to it
    and is renamed into place; an flock serialises concurrent pytest workers.
    The result must be treated as read-only: hosts use it as an overlay lowerdir.
    """
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    certs = _host_ca_certs()
    suite = suite or default_suite()
    if arch not in ARCHES:
        raise HostError(f"unknown arch {arch!r}: not one of {', '.join(ARCHES)}")
    problems = ensure_binfmt(arch)
    if problems:
        raise HostError(f"{arch} binaries cannot run here: " + "; ".join(problems))
    key = rootfs_key(certs, suite, arch)
    final = cache_dir / f"rootfs-{key}"
    if final.is_dir():
        return final
    with open(cache_dir / "rootfs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return final
        # We hold the lock, so any leftover temp dir is from a crashed build.
        for stale in cache_dir.glob(".tmp-rootfs-*"):
            safe_rmtree(stale)
        tmp = cache_dir / f".tmp-rootfs-{key}-{os.getpid()}"
        log = cache_dir / f"rootfs-{key}.build.log"
        try:
            with open(log, "wb") as log_fh:
                argv = _mmdebstrap_argv(tmp, suite, arch)
                argv[0] = tool("mmdebstrap")
                res = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_fh,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    check=False,
                )
            if res.returncode != 0:
                raise HostError(
                    f"mmdebstrap failed (exit {res.returncode}); log {log}:\n{tail(log)}"
                )
            _customize_rootfs(tmp, certs)
            os.rename(tmp, final)
        except BaseException:
            safe_rmtree(tmp)
            raise
    return final
