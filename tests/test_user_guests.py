"""Guests of your own through the same Guest API (GuestImages.user): a kernel + initrd booted directly, and a
disk image with its own boot loader, both reached by logging in on the serial console and configured through
it (each NIC found by its MAC address).

The "own" guests here are vhostni's images passed as if they were a user's: the harness must not rely on
what it knows about them (no ready marker, no vhostni.* kernel parameters, NICs not configured by /init).
The disk image is built here in a second, without root: a FAT file system holding the kernel and initramfs
with syslinux as its boot loader, converted to qcow2.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest

from vhostni.testing import GuestImages, UserNic, VhostUserNic

pytestmark = pytest.mark.guest

LAN = "192.0.2"


def test_own_kernel_and_initrd_behind_vhostni(vhostni_images, vhostni_guest_factory, vhostni_daemon_factory,
                                              vhostni_sockdir):
    own = GuestImages.user(vhostni_images.kernel, vhostni_images.initrd, append="quiet")
    socks = {n: str(vhostni_sockdir / f"{n}.sock") for n in ("ours", "theirs")}
    vhostni_daemon_factory(socks, name="user")
    ours, theirs = vhostni_guest_factory.many([
        ("ours", dict(nics=[VhostUserNic(socks["ours"])], ip=f"{LAN}.1/24")),
        # two NICs, only the second configured: the harness must find it by its MAC, not by its name
        ("theirs", dict(images=own, nics=[UserNic(), VhostUserNic(socks["theirs"])], ip=["none", f"{LAN}.2/24"],
                        mtu=[1500, 1400])),
    ])
    cmdline = theirs.check("cat /proc/cmdline").split()
    assert "quiet" in cmdline and not any(w.startswith("vhostni.") for w in cmdline), cmdline
    assert theirs.check("hostname").strip() == "theirs"
    assert f"inet {LAN}.2/24" in theirs.check("ip -o -4 addr show dev eth1")
    assert theirs.check("cat /sys/class/net/eth1/mtu").strip() == "1400"
    assert "inet " not in theirs.check("ip -o -4 addr show dev eth0")
    theirs.check(f"ping -c 2 -W 5 {LAN}.1", timeout=30)
    ours.check(f"ping -c 2 -W 5 {LAN}.2", timeout=30)


@pytest.fixture(scope="module")
def boot_disk(vhostni_images, tmp_path_factory):
    tools = ("mkfs.vfat", "mcopy", "syslinux", "qemu-img")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (dosfstools, mtools, syslinux, qemu-utils: .ci/deps.sh)")
    d = tmp_path_factory.mktemp("disk")
    (d / "syslinux.cfg").write_text("DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL vmlinuz\n"
                                    "  INITRD initrd.gz\n  APPEND console=ttyS0 panic=-1 booted.from=disk\n")
    fat = d / "fat.img"
    for cmd in (["mkfs.vfat", "-C", str(fat), "32768"],
                ["mcopy", "-i", str(fat), str(vhostni_images.kernel), "::vmlinuz"],
                ["mcopy", "-i", str(fat), str(vhostni_images.initrd), "::initrd.gz"],
                ["mcopy", "-i", str(fat), str(d / "syslinux.cfg"), "::syslinux.cfg"],
                ["syslinux", "--install", str(fat)],
                ["qemu-img", "convert", "-O", "qcow2", str(fat), str(d / "disk.qcow2")]):
        subprocess.run(cmd, check=True, capture_output=True)
    return d / "disk.qcow2"


def test_own_disk_image_with_its_boot_loader(boot_disk, vhostni_guest_factory):
    before = hashlib.sha256(boot_disk.read_bytes()).hexdigest()
    g = vhostni_guest_factory("disk", images=GuestImages.user(disk=boot_disk), nics=[UserNic()],
                              ip="10.0.2.15/24", boot_timeout=180)
    assert "booted.from=disk" in g.check("cat /proc/cmdline")       # its boot loader's command line
    assert "inet 10.0.2.15/24" in g.check("ip -o -4 addr show dev eth0")
    g.close()
    assert hashlib.sha256(boot_disk.read_bytes()).hexdigest() == before, "the disk image was written to"
