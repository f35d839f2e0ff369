"""virtio-blk on a real raw image file, driven through the transport like a guest driver would."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap

import pytest

from kvmpy.devices.virtio.blk import (VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, BlkStatus, BlockDevice, RequestType)
from kvmpy.devices.virtio.mmio import MmioTransport
from kvmpy.disk import DiskImageError, ext4_mount_count, make_ext4_image, read_file_from_image
from kvmpy.memory import GuestMemory
from virtio_driver import Driver

SECTORS = 64


@pytest.fixture
def mem():
    with GuestMemory(4 << 20) as m:
        yield m


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(range(256)) * (SECTORS * 2))
    return p


def bring_up(mem, image, **kwargs):
    dev = BlockDevice(image, **kwargs)
    t = MmioTransport(dev, mem)
    drv = Driver(t, mem)
    drv.setup()
    return dev, t, drv.queues[0], drv


def request(q, rtype: int, sector: int = 0, data: bytes = b"", in_len: int = 0, **kw):
    header = struct.pack("<IIQ", rtype, 0, sector)
    out = [header] + ([data] if data else [])
    head, addrs = q.add(out, ([in_len] if in_len else []) + [1], **kw)
    used = q.used_entries()
    assert [u[0] for u in used] == [head]
    status = q.memory.read_u8(addrs[-1])
    payload = q.memory.read(addrs[0], in_len) if in_len else b""
    return status, used[0][1], payload


def test_config_space_capacity_seg_max_size_max(mem, image):
    dev, t, q, drv = bring_up(mem, image)
    assert drv.config(0, 8) == SECTORS
    assert drv.config(8, 4) == 1 << 20      # size_max
    assert drv.config(12, 4) == 254         # seg_max
    assert drv.config(20, 4) == 512         # blk_size


def test_read_returns_image_bytes(mem, image):
    dev, t, q, _ = bring_up(mem, image)
    status, used, data = request(q, RequestType.IN, sector=2, in_len=1024)
    assert status == BlkStatus.OK and used == 1025
    assert data == image.read_bytes()[1024:2048]


def test_read_through_an_indirect_table(mem, image):
    dev, t, q, _ = bring_up(mem, image)
    status, _, data = request(q, RequestType.IN, sector=0, in_len=512, indirect=True)
    assert status == BlkStatus.OK and data == image.read_bytes()[:512]


def test_write_lands_in_the_image(mem, image):
    dev, t, q, _ = bring_up(mem, image)
    status, used, _ = request(q, RequestType.OUT, sector=5, data=b"\xAB" * 512)
    assert status == BlkStatus.OK and used == 1
    assert image.read_bytes()[5 * 512:6 * 512] == b"\xAB" * 512


def test_flush_is_ok_and_counted(mem, image):
    dev, t, q, _ = bring_up(mem, image)
    assert t.driver_features & VIRTIO_BLK_F_FLUSH
    status, _, _ = request(q, RequestType.FLUSH)
    assert status == BlkStatus.OK and dev.flushes == 1


def test_get_id_returns_the_serial(mem, image):
    dev, t, q, _ = bring_up(mem, image, serial="kvmpy-disk-7")
    status, used, data = request(q, RequestType.GET_ID, in_len=20)
    assert status == BlkStatus.OK and used == 21
    assert data == b"kvmpy-disk-7".ljust(20, b"\0")


def test_read_only_device_offers_ro_and_refuses_writes(mem, image):
    before = image.read_bytes()
    dev, t, q, drv = bring_up(mem, image, read_only=True)
    assert drv.device_features() & VIRTIO_BLK_F_RO
    status, _, _ = request(q, RequestType.OUT, sector=0, data=b"\0" * 512)
    assert status == BlkStatus.IOERR
    assert image.read_bytes() == before
    assert request(q, RequestType.IN, in_len=512)[0] == BlkStatus.OK


def test_access_past_the_capacity_is_an_io_error(mem, image):
    dev, t, q, _ = bring_up(mem, image)
    assert request(q, RequestType.IN, sector=SECTORS - 1, in_len=1024)[0] == BlkStatus.IOERR
    assert request(q, RequestType.IN, sector=2**63, in_len=512)[0] == BlkStatus.IOERR


def test_unaligned_length_is_an_io_error(mem, image):
    dev, t, q, _ = bring_up(mem, image)
    assert request(q, RequestType.IN, in_len=100)[0] == BlkStatus.IOERR


def test_unknown_request_type_is_unsupported(mem, image):
    dev, t, q, _ = bring_up(mem, image)
    assert request(q, 11)[0] == BlkStatus.UNSUPP  # DISCARD: not offered


def test_short_header_is_an_io_error(mem, image):
    dev, t, q, _ = bring_up(mem, image)
    head, addrs = q.add([b"\0" * 8], [1])
    q.used_entries()
    assert mem.read_u8(addrs[-1]) == BlkStatus.IOERR


def test_chain_without_status_byte_is_returned_unused(mem, image):
    dev, t, q, _ = bring_up(mem, image)
    head, _ = q.add([struct.pack("<IIQ", RequestType.IN, 0, 0)])
    assert q.used_entries() == [(head, 0)]
    assert not t.needs_reset


def test_flushed_write_survives_the_vmm_being_killed(tmp_path):
    """A child process completes OUT + FLUSH, then dies by SIGKILL; the data is in the file."""
    img = tmp_path / "kill.img"
    img.write_bytes(bytes(SECTORS * 512))
    tests_dir = os.path.dirname(os.path.dirname(__file__))
    script = textwrap.dedent(f"""
        import os, signal, struct, sys
        sys.path.insert(0, {tests_dir!r})
        from kvmpy.memory import GuestMemory
        from kvmpy.devices.virtio.blk import BlockDevice
        from kvmpy.devices.virtio.mmio import MmioTransport
        from virtio_driver import Driver
        mem = GuestMemory(1 << 20)
        t = MmioTransport(BlockDevice({str(img)!r}), mem)
        d = Driver(t, mem); d.setup(); q = d.queues[0]
        q.add([struct.pack("<IIQ", 1, 0, 3), b"durable!" * 64], [1])
        q.add([struct.pack("<IIQ", 4, 0, 0)], [1])
        assert len(q.used_entries()) == 2
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    assert img.read_bytes()[3 * 512:4 * 512] == b"durable!" * 64


def test_missing_image_names_the_file(tmp_path):
    with pytest.raises(OSError, match="nope.img"):
        BlockDevice(tmp_path / "nope.img")


def test_ext4_image_from_a_directory(tmp_path):
    src = tmp_path / "root"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "motd").write_text("hello from the host\n")
    img = make_ext4_image(tmp_path / "root.img", src, "8M")
    assert img.stat().st_size == 8 << 20
    assert ext4_mount_count(img) == 0
    assert read_file_from_image(img, "/etc/motd") == b"hello from the host\n"


def test_ext4_image_errors_are_clear(tmp_path):
    with pytest.raises(DiskImageError, match="not a directory"):
        make_ext4_image(tmp_path / "x.img", tmp_path / "missing", "8M")
    with pytest.raises(DiskImageError, match="too small"):
        make_ext4_image(tmp_path / "x.img", None, "4K")
    (tmp_path / "junk.img").write_bytes(bytes(4096))
    with pytest.raises(DiskImageError, match="superblock"):
        ext4_mount_count(tmp_path / "junk.img")


def test_disk_argument_parsing():
    from pathlib import Path

    from kvmpy.machine import ConfigError, DiskConfig
    assert DiskConfig.parse("root.img") == DiskConfig(Path("root.img"), False)
    assert DiskConfig.parse("root.img,ro") == DiskConfig(Path("root.img"), True)
    with pytest.raises(ConfigError, match="IMG,ro"):
        DiskConfig.parse("root.img,readonly")


def test_make_devices_makes_disks_rng_and_vsock(tmp_path, image):
    from kvmpy.devices.virtio.rng import EntropyDevice
    from kvmpy.devices.virtio.vsock import VsockDevice
    from kvmpy.machine import MachineConfig, VsockConfig, make_devices

    devs = make_devices(MachineConfig(kernel=None, disks=[f"{image},ro", image], rng=True,
                                      vsock=VsockConfig(7, "userspace", str(tmp_path / "v.sock"))))
    try:
        assert [type(d).__name__ for d in devs] == ["BlockDevice", "BlockDevice", "EntropyDevice", "VsockDevice"]
        assert devs[0].read_only and not devs[1].read_only
        assert isinstance(devs[2], EntropyDevice) and isinstance(devs[3], VsockDevice) and devs[3].guest_cid == 7
    finally:
        for d in devs:
            d.close()


def test_make_devices_closes_what_it_made_on_error(tmp_path, image):
    from kvmpy.machine import DeviceError, MachineConfig, make_devices
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(DeviceError, match="disks.1. .*missing.img"):
        make_devices(MachineConfig(kernel=None, disks=[image, tmp_path / "missing.img"]))
    assert len(os.listdir("/proc/self/fd")) == before
