"""End to end: kvmpy's guest kernel boots from a qcow2 image made by qemu-img, through a kvmpy overlay.

The root file system is an ext4 image turned into a compressed qcow2 by
`qemu-img convert -c` (what a Debian cloud image looks like: v3, zlib
clusters). kvmpy puts a kept overlay on it and serves the overlay over
virtio-blk (`root=/dev/vda rw`). The guest writes a file, syncs, remounts
the root read-only and powers off. The host then checks with QEMU's tools
that the overlay and the base are consistent (`qemu-img check`), that the
base is byte-for-byte unchanged, and (after `qemu-img convert` of the
overlay to raw) that the guest's file is in the file system.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest

from kvmpy.boot.initramfs import INIT_MARKER
from kvmpy.disk import make_ext4_image, populate_busybox_root, read_file_from_image
from kvmpy.machine import DEFAULT_CMDLINE, MachineConfig, build

pytestmark = [pytest.mark.e2e, pytest.mark.kvm,
              pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-utils not installed")]

BOOT_TIMEOUT = 600
TEXT = "written-into-the-overlay-7"


def test_guest_boots_from_a_qemu_img_qcow2_through_an_overlay(tmp_path):
    import kvmpy
    reason = kvmpy.kvm_available()
    if reason is not None:
        pytest.skip(f"needs a usable /dev/kvm: {reason}")
    from kvmpy.devices.virtio.blk import BlockDevice
    from kvmpy.guest.build import build_kernel
    from kvmpy.storage import create_overlay

    root = tmp_path / "root"
    populate_busybox_root(root)
    raw = make_ext4_image(tmp_path / "root.raw", root, "32M")
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", raw, base], check=True, timeout=120)
    base_sha = hashlib.sha256(base.read_bytes()).hexdigest()
    overlay = create_overlay(base, tmp_path / "vm.qcow2", keep=True)
    blk = BlockDevice(overlay)
    kernel = build_kernel(progress=False).vmlinux
    config = MachineConfig(kernel=kernel, initrd=None, memory="256M", vcpus=1,
                           cmdline=f"{DEFAULT_CMDLINE} root=/dev/vda rw rootfstype=ext4 init=/init")
    machine = build(config, devices=[blk])
    try:
        machine.start()
        con = machine.console
        at = con.wait_for(INIT_MARKER.encode(), BOOT_TIMEOUT)
        assert at >= 0, con.text()[-3000:]
        con.wait_for(b"# ", 60, at)
        machine.send_input(f"echo {TEXT} > /f; sync; mount -o remount,ro /; echo MARK-$((40+2))\n".encode())
        assert con.wait_for(b"MARK-42", 300, at) >= 0, con.text()[-3000:]
        machine.send_input(b"poweroff -f\n")
        machine.wait(180)
    finally:
        machine.stop()
        machine.close()  # closes the device, which flushes and closes the overlay
    console = machine.console.text()
    assert "EXT4-fs (vda): mounted filesystem" in console, console[-3000:]
    assert blk.bytes_written > 0 and blk.flushes > 0
    for image in (tmp_path / "vm.qcow2", base):
        r = subprocess.run(["qemu-img", "check", image], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    assert hashlib.sha256(base.read_bytes()).hexdigest() == base_sha
    flat = tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", tmp_path / "vm.qcow2", flat], check=True, timeout=120)
    assert read_file_from_image(flat, "/f") == f"{TEXT}\n".encode()
    os.unlink(flat)
