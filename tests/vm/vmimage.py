"""A cached Debian 12 cloud VM image for the VM tests: built with mmdebstrap, packed with
``mkfs.ext4 -d`` onto a sparse raw disk, booted with its own kernel and initrd (no bootloader).

Baked in for the test environment only (none of it is the product's business): the NoCloud
datasource, /etc/hosts, a resolver for qemu's user network, this machine's CA certificates (TLS
here goes through a local CA), an emptied machine-id, and qemu-guest-agent so the test can ask
the guest what happened without SSH.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"
#: What a stock Debian cloud image has that matters here, plus the guest agent (test only).
PACKAGES: tuple[str, ...] = (
    "systemd-sysv",
    "udev",
    "dbus",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "cloud-init",
    "ifupdown",
    "isc-dhcp-client",
    "iproute2",
    "netbase",
    "ca-certificates",
    "python3",
    "qemu-guest-agent",
)
MIRRORS: tuple[str, ...] = (
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
)
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
DISK_SIZE = "6G"
#: Bump when the customisation below changes (it is part of the cache key).
RECIPE_VERSION = 1

CLOUD_CFG = """\
# devpi-agent VM tests: NoCloud seed disk (cidata), then nothing.
datasource_list: [NoCloud, None]
manage_etc_hosts: localhost
# Stock images ship generated locales; this one has only the C.UTF-8 built into libc.
locale: C.UTF-8
"""
FILES: dict[str, str] = {
    "etc/cloud/cloud.cfg.d/90-devpi-agent-tests.cfg": CLOUD_CFG,
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    # qemu's user network answers DNS on 10.0.2.3; dhclient writes the same.
    "etc/resolv.conf": "nameserver 10.0.2.3\n",
    "etc/fstab": "/dev/vda / ext4 rw,errors=remount-ro 0 1\n",
    "etc/hostname": "devpi-vm\n",
    # Empty: every boot of a fresh copy makes its own id (first boot semantics, like a cloud).
    "etc/machine-id": "",
    "etc/network/interfaces": (
        "source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n"
    ),
}
REQUIRED_TOOLS: tuple[str, ...] = ("mmdebstrap", "mkfs.ext4", "chroot", "debugfs")


class ImageError(RuntimeError):
    """The VM image could not be built."""


@dataclass(frozen=True)
class Image:
    disk: Path  # raw ext4 filesystem (no partition table): root=/dev/vda
    kernel: Path
    initrd: Path
    key: str


def _host_ca_certs() -> list[tuple[str, bytes]]:
    if not HOST_CA_DIR.is_dir():
        return []
    return sorted(
        (str(p.relative_to(HOST_CA_DIR)), p.read_bytes())
        for p in HOST_CA_DIR.rglob("*.crt")
        if p.is_file()
    )


def _mmdebstrap_argv(target: str) -> list[str]:
    return [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--include=" + ",".join(PACKAGES),
        SUITE,
        target,
        *MIRRORS,
    ]


def image_key(certs: list[tuple[str, bytes]]) -> str:
    recipe = {
        "recipe": RECIPE_VERSION,
        "argv": _mmdebstrap_argv("<TARGET>"),
        "files": FILES,
        "disk": DISK_SIZE,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for name, data in certs:
        digest.update(b"\0cert\0" + name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()[:16]


def _run(argv: list[str], log: Path, timeout: float = 1800) -> None:
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
        )
    if result.returncode != 0:
        tail = log.read_bytes()[-4000:].decode(errors="replace")
        raise ImageError(f"{argv[0]} failed (exit {result.returncode}); log {log}:\n{tail}")


def _customize(root: Path, certs: list[tuple[str, bytes]], log: Path) -> None:
    for relative, text in FILES.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink()
        path.write_text(text)
        path.chmod(0o644)
    for name, data in certs:
        dest = root / HOST_CA_DIR.relative_to("/") / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        dest.chmod(0o644)
    _run(["chroot", str(root), "update-ca-certificates"], log)
    # A cloud instance starts without logs or apt lists of its own build.
    for leftover in ("var/lib/apt/lists", "var/cache/apt/archives"):
        for entry in (root / leftover).glob("*"):
            if entry.is_file():
                entry.unlink()


def _boot_files(root: Path) -> tuple[Path, Path]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if len(kernels) != 1 or len(initrds) != 1:
        raise ImageError(f"expected one kernel and one initrd in /boot, got {kernels} {initrds}")
    return kernels[0], initrds[0]


def build_image(cache_dir: Path) -> Image:
    """The cached image for the current recipe, built first if needed (under a lock)."""
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise ImageError(
            f"missing tools: {', '.join(missing)} (apt-get install mmdebstrap e2fsprogs)"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    certs = _host_ca_certs()
    key = image_key(certs)
    final = cache_dir / f"vm-{key}"
    image = Image(final / "disk.raw", final / "vmlinuz", final / "initrd.img", key)
    if final.is_dir():
        return image
    with open(cache_dir / "vm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return image
        for stale in cache_dir.glob(".tmp-vm-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = cache_dir / f".tmp-vm-{key}-{os.getpid()}"
        work.mkdir()
        log = cache_dir / f"vm-{key}.build.log"
        log.write_bytes(b"")
        try:
            root = work / "root"
            _run(_mmdebstrap_argv(str(root)), log)
            _customize(root, certs, log)
            kernel, initrd = _boot_files(root)
            shutil.copyfile(kernel, work / "vmlinuz")
            shutil.copyfile(initrd, work / "initrd.img")
            _run(["truncate", "-s", DISK_SIZE, str(work / "disk.raw")], log)
            _run(["mkfs.ext4", "-q", "-L", "root", "-d", str(root), str(work / "disk.raw")], log)
            shutil.rmtree(root)
            os.rename(work, final)
            # Only the current recipe's image is kept: each one is ~1 GB on disk.
            for old in cache_dir.glob("vm-*"):
                if old != final and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                    old.with_name(old.name + ".build.log").unlink(missing_ok=True)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return image


if __name__ == "__main__":  # pragma: no cover - manual use: build the image and say where
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.gettempdir())
    print(build_image(target))
