"""End to end (issue 14's "done when"): boot from a qcow2 made by qemu-img, clone it ten times, write in each.

The root file system is an ext4 image that `qemu-img convert` made a qcow2. The VM runs on a
throwaway kvmpy overlay of it (`DiskConfig(base, overlay=True)`, `--disk base.qcow2,overlay`), writes
a file, and is snapshotted. Ten clones are restored from the snapshot, each on an overlay of its
own; each writes its own file. Then, with QEMU's tools: every overlay and the base pass
`qemu-img check`, the base is byte-for-byte unchanged, and each clone's disk holds the parent's
file and its own, none of the others'.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest

from kvmpy.machine import DEFAULT_CMDLINE, DiskConfig, MachineConfig
from kvmpy.microvm import MicroVM

pytestmark = [pytest.mark.e2e, pytest.mark.kvm,
              pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-utils not installed")]

BOOT_TIMEOUT = 600
CMD_TIMEOUT = 180
CLONES = 10
CMDLINE = f"{DEFAULT_CMDLINE} clocksource=refined-jiffies root=/dev/vda rw rootfstype=ext4 init=/init"


def _disk_image(vm):
    from kvmpy.devices.virtio.blk import BlockDevice

    (slot,) = [s for s in vm.machine.virtio.slots if isinstance(s.device, BlockDevice)]
    return slot.device.image


def _files_in(overlay, tmp_path, names):
    from kvmpy.disk import DiskImageError, read_file_from_image

    flat = tmp_path / f"{overlay.name}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(overlay), str(flat)], check=True, timeout=120)
    try:
        found = {}
        for n in names:
            try:
                found[n] = read_file_from_image(flat, f"/{n}").decode().strip()
            except DiskImageError:  # "File not found"
                found[n] = None
        return found
    finally:
        flat.unlink()


def test_ten_clones_of_a_qcow2_booted_guest_each_keep_only_their_own_writes(tmp_path, guest_artifacts):
    from kvmpy.disk import make_ext4_image, populate_busybox_root

    vmlinux, _ = guest_artifacts
    root = tmp_path / "root"
    populate_busybox_root(root)
    raw = make_ext4_image(tmp_path / "root.raw", root, "32M")
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(base)], check=True, timeout=120)
    raw.unlink()
    base_sha = hashlib.sha256(base.read_bytes()).hexdigest()
    config = MachineConfig(kernel=vmlinux, initrd=None, memory="128M", cmdline=CMDLINE,
                           disks=[DiskConfig(base, overlay=True)])
    names = ["parent"] + [f"clone{i}" for i in range(CLONES)]
    clones: list[MicroVM] = []
    with MicroVM(config) as vm:
        vm.start()
        vm.expect("# ", BOOT_TIMEOUT)
        vm.run("dmesg -n 1", timeout=CMD_TIMEOUT)  # kernel messages off the console: they would mix with outputs
        assert vm.run("echo parent > /parent; sync; cat /parent", timeout=CMD_TIMEOUT).strip() == "parent"
        vm.snapshot(tmp_path / "snap")
        try:
            for _ in range(CLONES):
                clones.append(MicroVM.restore(tmp_path / "snap"))
            for i, c in enumerate(clones):
                # remount read-only: ext4 writes its journal back, so the host reads the file system as is
                out = c.run(f"echo clone{i} > /clone{i}; sync; mount -o remount,ro /; cat /parent /clone{i}",
                            timeout=CMD_TIMEOUT)
                assert out.split()[-2:] == ["parent", f"clone{i}"], out
            overlays = [_disk_image(c).path for c in clones]
            assert len(set(overlays)) == CLONES and _disk_image(vm).path not in overlays
            for i, (c, overlay) in enumerate(zip(clones, overlays)):
                c.pause()
                r = subprocess.run(["qemu-img", "check", "-U", str(overlay)], capture_output=True, text=True,
                                   timeout=120)
                assert r.returncode == 0, r.stdout + r.stderr
                found = _files_in(overlay, tmp_path, names)
                assert found == {n: (n if n in ("parent", f"clone{i}") else None) for n in names}, found
        finally:
            for c in clones:
                c.close()
    assert all(not p.exists() for p in overlays)  # the clones' throwaway overlays went with them
    r = subprocess.run(["qemu-img", "check", str(base)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert hashlib.sha256(base.read_bytes()).hexdigest() == base_sha
