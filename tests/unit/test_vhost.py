"""The vhost-vsock fd wrapper without /dev/vhost-vsock: its memory table from real guest RAM, its open errors.

The memory table is checked against the mappings themselves: bytes written
by guest-physical address through `GuestMemory` are read back at the host
address the table gives, through ctypes.
"""

from __future__ import annotations

import ctypes
import errno

import pytest

from kvmpy.devices.virtio.vhost import VhostVsock, _open_error, memory_table
from kvmpy.errors import KvmIoctlError, VhostUnavailableError, VsockCidInUseError
from kvmpy.memory import MMIO_HOLE_END, GuestMemory


@pytest.fixture
def mem():
    m = GuestMemory("8M")
    m.add_region(MMIO_HOLE_END, 2 << 20)  # a second slot above 4 GiB, as a large guest has
    yield m
    m.close()


def test_memory_table_has_every_region_with_its_size(mem):
    table = memory_table(mem)
    assert [(r.guest_phys_addr, r.memory_size) for r in table] == [(0, 8 << 20), (MMIO_HOLE_END, 2 << 20)]


def test_memory_table_host_addresses_are_the_mappings(mem):
    for entry, (gpa, size) in zip(memory_table(mem), mem.ram_ranges()):
        for offset in (0, 0x1234, size - 8):
            pattern = (gpa + offset).to_bytes(8, "little")
            mem.write(gpa + offset, pattern)
            assert ctypes.string_at(entry.userspace_addr + offset, 8) == pattern


def test_memory_table_entries_are_page_aligned_as_vhost_requires(mem):
    for r in memory_table(mem):
        assert r.guest_phys_addr % 4096 == r.memory_size % 4096 == r.userspace_addr % 4096 == 0


def test_missing_device_names_it_and_the_module_to_load(tmp_path):
    path = str(tmp_path / "vhost-vsock")
    with pytest.raises(VhostUnavailableError, match=rf"^{path}: no such device; .*'modprobe vhost_vsock'"):
        VhostVsock(path)


def test_a_file_that_is_not_vhost_vsock_is_refused_naming_the_ioctl(tmp_path):
    path = tmp_path / "not-vhost"
    path.write_bytes(b"")
    with pytest.raises(VhostUnavailableError, match=r"not a vhost-vsock device \(VHOST_GET_FEATURES: ENOTTY"):
        VhostVsock(str(path))


def test_permission_problem_says_how_to_get_access():
    # Tests may run as root, where no file refuses to open; check the message builder.
    e = _open_error("/dev/vhost-vsock", PermissionError(errno.EACCES, "Permission denied"))
    assert str(e).startswith("/dev/vhost-vsock: permission denied; run as root or give your user the device")


def test_a_node_without_its_driver_says_modprobe():
    e = _open_error("/dev/vhost-vsock", OSError(errno.ENODEV, "No such device"))
    assert "modprobe vhost_vsock" in str(e)


def test_cid_in_use_is_an_ioctl_error_naming_the_cid():
    e = VsockCidInUseError("VHOST_VSOCK_SET_GUEST_CID", errno.EADDRINUSE, "guest CID 3 is taken by another VM")
    assert isinstance(e, KvmIoctlError) and e.errno == errno.EADDRINUSE
    assert str(e) == ("VHOST_VSOCK_SET_GUEST_CID: EADDRINUSE (Address already in use): "
                      "guest CID 3 is taken by another VM")
