"""The test tiers' cached images: one per release, variant and arch, each keyed on its own inputs
(bookworm's plain VM image and amd64 rootfs keep the keys they had), and the binfmt check that
makes the arm64 test fail, naming what is missing, rather than skip."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "integration"))
sys.path.insert(0, str(TESTS / "vm"))

import rootfs  # noqa: E402
import vmimage  # noqa: E402

CERTS = [("local/test.crt", b"a certificate")]


def test_each_vm_flavour_has_its_own_key() -> None:
    keys = {
        (suite, variant): vmimage.image_key(CERTS, suite, variant)
        for suite in vmimage.SUITES
        for variant in vmimage.VARIANTS
    }
    assert len(set(keys.values())) == len(keys)
    assert keys[("bookworm", "plain")] == vmimage.image_key(CERTS)


def test_first_boot_variant_adds_the_apt_housekeeping() -> None:
    argv = vmimage._mmdebstrap_argv("<T>", "trixie", "first-boot")
    assert "trixie" in argv and any("unattended-upgrades" in a for a in argv)
    files = vmimage._files("first-boot")
    assert "OnBootSec=1s" in files["etc/systemd/system/apt-daily.timer.d/first-boot.conf"]
    assert "RandomizedDelaySec=0" in files["etc/systemd/system/apt-daily.timer.d/first-boot.conf"]
    # cloud-init orders cloud-final before apt-daily: the image starts it as cloud-final starts.
    kick = files["etc/systemd/system/cloud-final.service.d/apt-daily-now.conf"]
    assert "--job-mode=ignore-dependencies apt-daily.service" in kick
    # trixie's cloud-init would ask for DHCPv6, which qemu's user network does not answer.
    assert "dhcp4: true" in "".join(vmimage._files("plain", "trixie").values())
    assert vmimage._files("plain", "bookworm") == vmimage.FILES
    plain = vmimage._mmdebstrap_argv("<T>", "bookworm", "plain")
    assert not any("unattended-upgrades" in a for a in plain)
    assert vmimage._files("plain") == vmimage.FILES


def test_an_image_without_a_recipe_is_bookworms_plain_one(tmp_path: Path) -> None:
    assert vmimage._flavour(tmp_path) == ("bookworm", "plain")
    (tmp_path / "recipe.json").write_text('{"suite": "trixie", "variant": "first-boot"}')
    assert vmimage._flavour(tmp_path) == ("trixie", "first-boot")


def test_only_a_foreign_arch_is_named_to_mmdebstrap() -> None:
    assert not any(a.startswith("--architectures") for a in rootfs._mmdebstrap_argv(None))
    assert "--architectures=arm64" in rootfs._mmdebstrap_argv(None, arch="arm64")
    assert rootfs.rootfs_key(CERTS, arch="arm64") != rootfs.rootfs_key(CERTS)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (None, "no binfmt entry"),
        ("disabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: P\n", "disabled"),
        ("enabled\ninterpreter /x\nflags: P\n", "lacks the F flag"),
        ("enabled\ninterpreter /x\nflags: PF\n", None),
    ],
)
def test_binfmt_problems_name_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str | None, problem: str | None
) -> None:
    monkeypatch.setattr(rootfs, "BINFMT_DIR", tmp_path)
    assert "not mounted" in rootfs.binfmt_problems("arm64")[0]
    (tmp_path / "status").write_text("enabled\n")
    if entry is not None:
        (tmp_path / "qemu-aarch64").write_text(entry)
    found = rootfs.binfmt_problems("arm64")
    if problem is None:
        assert found == []
    else:
        assert len(found) >= 1 and problem in " ".join(found), found
    assert rootfs.binfmt_problems("amd64") == []
