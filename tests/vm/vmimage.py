"""Cached Debian cloud VM images for the VM tests, one per release (bookworm, trixie) and variant:
built with mmdebstrap, packed with ``mkfs.ext4 -d`` onto a sparse raw disk, booted with their own
kernel and initrd (no bootloader).

Baked in for the test environment only (none of it is the product's business): the NoCloud
datasource, /etc/hosts, a resolver for qemu's user network, this machine's CA certificates (TLS
here goes through a local CA), an emptied machine-id, and qemu-guest-agent so the test can ask
the guest what happened without SSH.

The ``first-boot`` variant adds what an Ubuntu 24.04 cloud image does on its first boot:
unattended-upgrades with the apt-daily and apt-daily-upgrade timers enabled (and made to fire at
boot: apt-daily starts as cloud-final starts and refreshes the missing lists, holding
``/var/lib/apt/lists/lock``, then unattended-upgrade runs), and needrestart restarting services by
itself as Ubuntu's does. Every image starts without apt lists, as a cloud image does.

Each image is ``<cache>/vm-<key>/`` (``recipe.json`` names its release and variant); only the
newest image of each release and variant is kept.
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

SUITES: tuple[str, ...] = ("bookworm", "trixie")
SUITE = "bookworm"
VARIANTS: tuple[str, ...] = ("plain", "first-boot")
VARIANT = "plain"
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
#: A release's own extra packages: cloud-init 25 (trixie) fails its resizefs module without
#: resize2fs, which stock cloud images have (minbase does not).
SUITE_PACKAGES: dict[str, tuple[str, ...]] = {"trixie": ("e2fsprogs",)}
#: What the first-boot variant adds: an Ubuntu cloud image's apt housekeeping.
FIRST_BOOT_PACKAGES: tuple[str, ...] = ("unattended-upgrades", "needrestart")


def mirrors(suite: str) -> tuple[str, ...]:
    return (
        f"deb http://deb.debian.org/debian {suite} main",
        f"deb http://deb.debian.org/debian {suite}-updates main",
        f"deb http://deb.debian.org/debian-security {suite}-security main",
    )


MIRRORS: tuple[str, ...] = mirrors(SUITE)
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
#: A release's own files (on top of FILES). cloud-init 25 (trixie) adds DHCPv6 to its fallback
#: network config, which qemu's user network does not answer: ifup then holds networking.service
#: for its 5 min timeout and fails. The NIC (qemu's first virtio-net, ens3) gets DHCPv4 only.
SUITE_FILES: dict[str, dict[str, str]] = {
    "trixie": {
        "etc/cloud/cloud.cfg.d/91-devpi-agent-tests-network.cfg": (
            "network:\n  version: 2\n  ethernets:\n    ens3:\n      dhcp4: true\n"
        ),
        # No sshd here: cloud-init 25 reports each host key it cannot make as an error, which
        # makes `cloud-init status` exit 2 (degraded).
        "etc/cloud/cloud.cfg.d/92-devpi-agent-tests-ssh.cfg": "ssh_genkeytypes: []\n",
    },
}
#: The first-boot variant's files (on top of FILES).
FIRST_BOOT_FILES: dict[str, str] = {
    # As Ubuntu ships it: refresh the lists and run unattended-upgrade every day.
    "etc/apt/apt.conf.d/20auto-upgrades": (
        'APT::Periodic::Update-Package-Lists "1";\nAPT::Periodic::Unattended-Upgrade "1";\n'
    ),
    # The stock timers fire at 6:00/18:00 plus up to 12 h; here they fire at boot.
    "etc/systemd/system/apt-daily.timer.d/first-boot.conf": (
        "[Timer]\nOnBootSec=1s\nRandomizedDelaySec=0\n"
    ),
    # cloud-init orders cloud-final Before=apt-daily.service (on Debian and Ubuntu), so a
    # timer's apt-daily waits until the bootstrap is done. Make it run as cloud-final starts,
    # as on the hosts where user data met apt's locks: the queued job, started again with
    # ignore-dependencies, loses its ordering and runs now.
    "etc/systemd/system/cloud-final.service.d/apt-daily-now.conf": (
        "[Service]\nExecStartPre=-/usr/bin/systemctl start --no-block"
        " --job-mode=ignore-dependencies apt-daily.service\n"
    ),
    # Then unattended-upgrade (apt-daily-upgrade.service is ordered after apt-daily).
    "etc/systemd/system/apt-daily-upgrade.timer.d/first-boot.conf": (
        "[Timer]\nOnBootSec=1s\nRandomizedDelaySec=0\n"
    ),
    # Ubuntu 24.04's needrestart restarts services by itself after every apt run, but not
    # cloud-init's own units (cloud-init#5109).
    "etc/needrestart/conf.d/90-ubuntu-like.conf": (
        "$nrconf{restart} = 'a';\n$nrconf{override_rc}{qr(^cloud-)} = 0;\n"
    ),
}
#: Units the first-boot variant checks are enabled once it is built.
FIRST_BOOT_TIMERS: tuple[str, ...] = ("apt-daily.timer", "apt-daily-upgrade.timer")
REQUIRED_TOOLS: tuple[str, ...] = ("mmdebstrap", "mkfs.ext4", "chroot", "debugfs")


class ImageError(RuntimeError):
    """The VM image could not be built."""


@dataclass(frozen=True)
class Image:
    disk: Path  # raw ext4 filesystem (no partition table): root=/dev/vda
    kernel: Path
    initrd: Path
    key: str
    suite: str = SUITE
    variant: str = VARIANT


def _host_ca_certs() -> list[tuple[str, bytes]]:
    if not HOST_CA_DIR.is_dir():
        return []
    return sorted(
        (str(p.relative_to(HOST_CA_DIR)), p.read_bytes())
        for p in HOST_CA_DIR.rglob("*.crt")
        if p.is_file()
    )


def _packages(variant: str, suite: str = SUITE) -> tuple[str, ...]:
    extra = FIRST_BOOT_PACKAGES if variant == "first-boot" else ()
    return PACKAGES + SUITE_PACKAGES.get(suite, ()) + extra


def _files(variant: str, suite: str = SUITE) -> dict[str, str]:
    return {
        **FILES,
        **SUITE_FILES.get(suite, {}),
        **(FIRST_BOOT_FILES if variant == "first-boot" else {}),
    }


def _mmdebstrap_argv(target: str, suite: str = SUITE, variant: str = VARIANT) -> list[str]:
    return [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--include=" + ",".join(_packages(variant, suite)),
        suite,
        target,
        *mirrors(suite),
    ]


def image_key(certs: list[tuple[str, bytes]], suite: str = SUITE, variant: str = VARIANT) -> str:
    # The release and variant are in the command line and the files: bookworm's plain image
    # keeps the key it had before there were others.
    recipe = {
        "recipe": RECIPE_VERSION,
        "argv": _mmdebstrap_argv("<TARGET>", suite, variant),
        "files": _files(variant, suite),
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


def _customize(
    root: Path, certs: list[tuple[str, bytes]], suite: str, variant: str, log: Path
) -> None:
    for relative, text in _files(variant, suite).items():
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
    if variant == "first-boot":
        for timer in FIRST_BOOT_TIMERS:
            if not (root / "etc/systemd/system/timers.target.wants" / timer).exists():
                raise ImageError(f"{timer} is not enabled in the image")
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


def _flavour(directory: Path) -> tuple[str, str]:
    """(suite, variant) of a cached image; one without recipe.json is bookworm's plain image
    (the only kind there was before)."""
    try:
        recipe = json.loads((directory / "recipe.json").read_text())
        return str(recipe["suite"]), str(recipe["variant"])
    except (OSError, ValueError, KeyError):
        return SUITE, VARIANT


def build_image(cache_dir: Path, suite: str = SUITE, variant: str = VARIANT) -> Image:
    """The cached image of `suite` and `variant` for the current recipe, built first if needed
    (under a lock)."""
    if suite not in SUITES or variant not in VARIANTS:
        raise ImageError(f"no VM image recipe for {suite!r} {variant!r}")
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise ImageError(
            f"missing tools: {', '.join(missing)} (apt-get install mmdebstrap e2fsprogs)"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    certs = _host_ca_certs()
    key = image_key(certs, suite, variant)
    final = cache_dir / f"vm-{key}"
    image = Image(final / "disk.raw", final / "vmlinuz", final / "initrd.img", key, suite, variant)
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
        log.write_bytes(f"# {suite} {variant}\n".encode())
        try:
            root = work / "root"
            _run(_mmdebstrap_argv(str(root), suite, variant), log)
            _customize(root, certs, suite, variant, log)
            kernel, initrd = _boot_files(root)
            shutil.copyfile(kernel, work / "vmlinuz")
            shutil.copyfile(initrd, work / "initrd.img")
            _run(["truncate", "-s", DISK_SIZE, str(work / "disk.raw")], log)
            _run(["mkfs.ext4", "-q", "-L", "root", "-d", str(root), str(work / "disk.raw")], log)
            shutil.rmtree(root)
            (work / "recipe.json").write_text(
                json.dumps({"suite": suite, "variant": variant, "key": key}) + "\n"
            )
            os.rename(work, final)
            # Only the current recipe's image of each release and variant is kept: ~0.6-1 GB.
            for old in cache_dir.glob("vm-*"):
                if old != final and old.is_dir() and _flavour(old) == (suite, variant):
                    shutil.rmtree(old, ignore_errors=True)
                    old.with_name(old.name + ".build.log").unlink(missing_ok=True)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return image


if __name__ == "__main__":  # pragma: no cover - manual use: build the image and say where
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.gettempdir())
    print(build_image(target, *sys.argv[2:4]))
