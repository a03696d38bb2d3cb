"""A local libvirt Vagrant box made from the VM tier's cached Debian 12 image (the Ubuntu box the
Vagrantfile names cannot be downloaded here): box.img (qcow2) + metadata.json + a Vagrantfile,
packed as a .box and cached as vagrant-box-<key>, keyed on the image and on this recipe.

What a Vagrant box has and the VM image lacks, added for the test only: openssh-server, sudo and
the `vagrant` user with Vagrant's insecure key (Vagrant replaces it on the first `up`). The box's
Vagrantfile boots the image's own kernel and initrd (the image has no bootloader) under qemu's TCG
(`driver = "qemu"`: no KVM here), with fixed interface names and a DHCP eth0 (the box's business,
as a box's network setup is; cloud-init's network config is off in this box). It sets no serial
console: vagrant-libvirt 0.11.2 raises a TypeError on a box that does.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent / "vm"))

from vmimage import Image  # noqa: E402

#: Bump when anything below changes (it is part of the cache key).
BOX_RECIPE_VERSION = 1
INSECURE_KEY = Path("/usr/share/rubygems-integration/all/gems/vagrant-2.3.4/keys/vagrant.pub")
VIRTUAL_SIZE_GB = 6

BOX_VAGRANTFILE = """\
# The devpi-agent test box (tests/vagrant/vagrantbox.py): Debian 12 booted by its own kernel.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.driver = "qemu"
    lv.kernel = File.join(__dir__, "vmlinuz")
    lv.initrd = File.join(__dir__, "initrd.img")
    lv.cmd_line = "root=/dev/vda rw net.ifnames=0 biosdevname=0 panic=-1"
    lv.cpu_mode = "custom"
    lv.cpu_model = "qemu64"
    lv.graphics_type = "none"
    lv.video_type = "none"
  end
end
"""

CUSTOMIZE = """\
set -euo pipefail
root=$1 key=$2
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
mount --bind /etc/resolv.conf "$root/etc/resolv.conf"
printf '#!/bin/sh\\nexit 101\\n' > "$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
export DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin
chroot "$root" apt-get update -qq
chroot "$root" apt-get install -y -qq --no-install-recommends openssh-server sudo
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root/usr/sbin/policy-rc.d"
chroot "$root" useradd --create-home --shell /bin/bash vagrant
install -d -m 0700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
install -m 0600 -o 1000 -g 1000 "$key" "$root/home/vagrant/.ssh/authorized_keys"
echo 'vagrant ALL=(ALL) NOPASSWD:ALL' > "$root/etc/sudoers.d/vagrant"
chmod 0440 "$root/etc/sudoers.d/vagrant"
printf 'auto eth0\\niface eth0 inet dhcp\\n' > "$root/etc/network/interfaces.d/eth0"
printf '# the test box: eth0 is configured by the box\\nnetwork: {config: disabled}\\n' \\
    > "$root/etc/cloud/cloud.cfg.d/91-vagrant-box.cfg"
umount "$root/etc/resolv.conf" "$root/dev" "$root/proc"
"""


class BoxError(RuntimeError):
    """The box could not be built."""


@dataclass(frozen=True)
class Box:
    file: Path  # the .box to `vagrant box add`
    key: str


def box_key(image: Image) -> str:
    recipe = {
        "recipe": BOX_RECIPE_VERSION,
        "image": image.key,
        "vagrantfile": BOX_VAGRANTFILE,
        "customize": CUSTOMIZE,
        "insecure_key": hashlib.sha256(INSECURE_KEY.read_bytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


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
        )
    if result.returncode != 0:
        tail = log.read_bytes()[-4000:].decode(errors="replace")
        raise BoxError(f"{argv[0]} failed (exit {result.returncode}); log {log}:\n{tail}")


def build_box(image: Image, cache_dir: Path) -> Box:
    """The cached box for this image and recipe, built first if needed (under a lock)."""
    if not INSECURE_KEY.is_file():
        raise BoxError(f"{INSECURE_KEY} is missing (apt-get install vagrant)")
    key = box_key(image)
    final = cache_dir / f"vagrant-box-{key}"
    box = Box(final / "devpi-agent-test.box", key)
    if final.is_dir():
        return box
    with open(cache_dir / "vagrant-box.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return box
        for stale in cache_dir.glob(".tmp-vagrant-box-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = cache_dir / f".tmp-vagrant-box-{key}-{os.getpid()}"
        work.mkdir()
        log = cache_dir / f"vagrant-box-{key}.build.log"
        log.write_bytes(b"")
        try:
            disk = work / "disk.raw"
            _run(["cp", "--sparse=always", str(image.disk), str(disk)], log)
            mnt = work / "mnt"
            mnt.mkdir()
            (work / "customize.sh").write_text(CUSTOMIZE)
            # A private mount namespace: nothing stays mounted if this dies half way.
            _run(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    'mount -o loop "$0" "$1" && bash "$2" "$1" "$3"; rc=$?; umount "$1"; exit $rc',
                    str(disk),
                    str(mnt),
                    str(work / "customize.sh"),
                    str(INSECURE_KEY),
                ],
                log,
            )
            _run(["qemu-img", "convert", "-O", "qcow2", str(disk), str(work / "box.img")], log)
            disk.unlink()
            shutil.copyfile(image.kernel, work / "vmlinuz")
            shutil.copyfile(image.initrd, work / "initrd.img")
            (work / "Vagrantfile").write_text(BOX_VAGRANTFILE)
            (work / "metadata.json").write_text(
                json.dumps(
                    {"provider": "libvirt", "format": "qcow2", "virtual_size": VIRTUAL_SIZE_GB}
                )
            )
            _run(
                [
                    "tar",
                    "-C",
                    str(work),
                    "-cf",
                    str(work / "devpi-agent-test.box"),
                    "metadata.json",
                    "Vagrantfile",
                    "box.img",
                    "vmlinuz",
                    "initrd.img",
                ],
                log,
            )
            for part in ("box.img", "vmlinuz", "initrd.img", "customize.sh"):
                (work / part).unlink()
            mnt.rmdir()
            os.rename(work, final)
            for old in cache_dir.glob("vagrant-box-*"):
                if old != final and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                    old.with_name(old.name + ".build.log").unlink(missing_ok=True)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return box
