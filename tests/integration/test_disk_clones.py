"""Disks of machines and of their clones: overlays, locks, and refusing a changed disk (issue 14, items 2-3).

The machines are tiny ELF "kernels" that spin (tests/integration/test_machine_outcomes.py's); the disks
are real raw and qcow2 files, checked with QEMU's own `qemu-img`. Guest writes are made through each
machine's virtio-blk device's image, as the device does for the guest.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest

from kvmpy.machine import ConfigError, DiskConfig, MachineConfig, build, fork
from kvmpy.snapshot import Snapshot, restore_machine, take_snapshot
from kvmpy.storage import DiskChangedError, ImageLockedError

from test_machine_outcomes import _elf

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-utils not installed")

MiB = 1 << 20


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check(path) -> None:
    r = subprocess.run(["qemu-img", "check", "-U", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _disk(machine):
    from kvmpy.devices.virtio.blk import BlockDevice

    (slot,) = [s for s in machine.virtio.slots if isinstance(s.device, BlockDevice)]
    return slot.device


@pytest.fixture
def base(tmp_path):
    p = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "8M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(p)], check=True, capture_output=True)
    return p


def test_disk_option_grammar_for_overlays():
    assert DiskConfig.parse("b.qcow2,overlay").overlay is True
    assert DiskConfig.parse("b.qcow2,overlay=/tmp/vm.qcow2,format=qcow2") == DiskConfig(
        DiskConfig.parse("b.qcow2").path, False, "qcow2", "/tmp/vm.qcow2")
    with pytest.raises(ConfigError, match="an overlay is for writing"):
        DiskConfig.parse("b.qcow2,ro,overlay")


def test_a_vm_on_an_overlay_never_writes_its_base(tmp_path, kvm, base):
    before = _sha(base)
    config = MachineConfig(kernel=_elf(tmp_path, "spin"), memory="64M", disks=[DiskConfig(base, overlay=True)])
    with build(config, kvm=kvm) as m:
        disk = _disk(m)
        assert disk.image.base == base.resolve() and disk.image.path != base
        disk.image.write(4096, b"vm" * 2048)
        disk.image.flush()
        assert disk.image.read(4096, 4) == b"vmvm" and disk.image.read(0, 2) == b"\x5a\x5a"
        with pytest.raises(ImageLockedError, match="base.qcow2"):  # a second writer of the base: refused
            build(MachineConfig(kernel=_elf(tmp_path, "spin"), memory="64M", disks=[base]), kvm=kvm)
        overlay = disk.image.path
        _check(overlay)
    assert not overlay.exists()  # a throwaway overlay goes with its VM
    assert _sha(base) == before
    _check(base)


def test_clones_each_get_their_own_overlay_and_see_only_their_own_writes(tmp_path, kvm, base):
    before = _sha(base)
    kept = tmp_path / "vm.qcow2"
    config = MachineConfig(kernel=_elf(tmp_path, "spin"), memory="64M", disks=[DiskConfig(base, overlay=str(kept))])
    with build(config, kvm=kvm) as m:
        _disk(m).image.write(0, b"parent-before")
        take_snapshot(m, tmp_path / "snap")
        _disk(m).image.write(0, b"parent-AFTER!")  # the VM writes on after the snapshot
        snap = Snapshot.open(tmp_path / "snap")
        assert "disk0.qcow2" in snap.manifest["files"]
        clones = [restore_machine(snap, kvm=kvm)[0] for _ in range(10)]
        try:
            paths = {_disk(c).image.path for c in clones}
            assert len(paths) == 10 and kept not in paths
            for i, c in enumerate(clones):
                img = _disk(c).image
                assert img.read(0, 13) == b"parent-before"  # the disk as it was at the snapshot
                img.write(8192, f"clone {i}".encode())
                img.flush()
            for i, c in enumerate(clones):
                img = _disk(c).image
                assert img.read(8192, 7) == f"clone {i}".encode()
                _check(img.path)
            assert _disk(m).image.read(0, 13) == b"parent-AFTER!" and _disk(m).image.read(8192, 5) != b"clone"
        finally:
            for c in clones:
                c.close()
    assert all(not p.exists() for p in paths)
    assert _sha(base) == before
    _check(kept)
    _check(base)


def test_a_restore_onto_a_changed_disk_is_refused_unless_forced(tmp_path, kvm):
    disk = tmp_path / "data.img"
    disk.write_bytes(bytes(4 * MiB))
    config = MachineConfig(kernel=_elf(tmp_path, "spin"), memory="64M", disks=[DiskConfig(disk, read_only=True)])
    with build(config, kvm=kvm) as m:
        take_snapshot(m, tmp_path / "snap")
    with open(disk, "r+b") as f:  # somebody writes the disk after the snapshot
        f.seek(1 * MiB)
        f.write(b"changed")
    with pytest.raises(DiskChangedError, match="data.img: disk changed since it was recorded"):
        restore_machine(tmp_path / "snap", kvm=kvm)
    clone, _ = restore_machine(tmp_path / "snap", kvm=kvm, force_disks=True)
    with clone:
        assert _disk(clone).image.read(1 * MiB, 7) == b"changed"


def test_a_clone_of_a_vm_still_writing_its_disk_is_refused_naming_the_holder(tmp_path, kvm):
    import os

    disk = tmp_path / "rw.img"
    disk.write_bytes(bytes(4 * MiB))
    config = MachineConfig(kernel=_elf(tmp_path, "spin"), memory="64M", disks=[disk])
    with build(config, kvm=kvm) as m:
        take_snapshot(m, tmp_path / "snap")
        with pytest.raises(ImageLockedError, match=f"rw.img.*pid {os.getpid()}"):
            restore_machine(tmp_path / "snap", kvm=kvm)
    clone, _ = restore_machine(tmp_path / "snap", kvm=kvm)  # the original is gone: the clone gets an overlay
    with clone:
        img = _disk(clone).image
        img.write(0, b"clone")
        img.flush()
        assert img.path != disk
    assert disk.read_bytes()[:5] == bytes(5)  # the clone's write never reached the disk


def test_fork_children_of_a_vm_on_an_overlay_each_get_their_own_disk(tmp_path, kvm, base):
    before = _sha(base)
    config = MachineConfig(kernel=_elf(tmp_path, "spin"), memory="64M", disks=[DiskConfig(base, overlay=True)])
    with build(config, kvm=kvm) as m:
        _disk(m).image.write(0, b"before fork")
        children = fork(m, 3)
        try:
            _disk(m).image.write(0, b"parent after")  # the parent writes on
            for i, c in enumerate(children):
                img = _disk(c).image
                assert img.read(0, 11) == b"before fork"  # the disk as it was at the fork
                img.write(4096, f"child {i}".encode())
                img.flush()
            for i, c in enumerate(children):
                assert _disk(c).image.read(4096, 7) == f"child {i}".encode()
                _check(_disk(c).image.path)
            assert len({_disk(c).image.path for c in children} | {_disk(m).image.path}) == 4
            assert _disk(m).image.read(4096, 5) != b"child"
        finally:
            for c in children:
                c.close()
    assert _sha(base) == before
    _check(base)


def test_fork_of_a_vm_writing_a_plain_disk_is_refused_saying_what_to_do(tmp_path, kvm):
    from kvmpy.machine.fork import ForkError

    disk = tmp_path / "rw.img"
    disk.write_bytes(bytes(4 * MiB))
    with build(MachineConfig(kernel=_elf(tmp_path, "spin"), memory="64M", disks=[disk]), kvm=kvm) as m:
        with pytest.raises(ForkError, match=r"writable: children cannot share it; give the VM an overlay disk"):
            fork(m, 2)
