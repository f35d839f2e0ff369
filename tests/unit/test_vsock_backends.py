"""Choosing the vsock back end: auto, vhost, userspace, on a host with or without /dev/vhost-vsock.

The device node is given as a path (or the module's constant is pointed at
one) in a temporary directory: absent, or a file that is not vhost-vsock.
Nothing stands in for the kernel; what needs the real device is in
tests/integration/test_vhost_vsock.py.
"""

from __future__ import annotations

import logging

import pytest

from kvmpy.devices.virtio import vsock
from kvmpy.devices.virtio.vsock import VirtioVsock, VsockDevice, vhost_vsock_available, vsock_device
from kvmpy.errors import VhostUnavailableError


@pytest.fixture
def absent_node(tmp_path, monkeypatch):
    """The module's /dev/vhost-vsock moved to a path where nothing exists."""
    path = tmp_path / "dev" / "vhost-vsock"
    monkeypatch.setattr(vsock, "VHOST_VSOCK_PATH", str(path))
    return str(path)


def test_auto_picks_userspace_when_the_device_node_is_absent(absent_node, tmp_path):
    dev = vsock_device(3, uds_path=tmp_path / "v.sock")
    try:
        assert isinstance(dev, VsockDevice) and dev.backend == "userspace"
        assert dev.uds_path == str(tmp_path / "v.sock") and dev.guest_cid == 3
    finally:
        dev.close()


def test_vhost_requested_without_the_device_node_names_it_and_the_fix(absent_node):
    with pytest.raises(VhostUnavailableError) as e:
        vsock_device(3, backend="vhost")
    assert str(e.value).startswith(f"{absent_node}: no such device")
    assert "/dev/vhost-vsock" in str(e.value) and "modprobe vhost_vsock" in str(e.value)


def test_vhost_path_parameter_overrides_the_default(tmp_path):
    missing = str(tmp_path / "elsewhere")
    assert not vhost_vsock_available(missing)
    with pytest.raises(VhostUnavailableError, match=f"^{missing}: no such device"):
        vsock_device(3, backend="vhost", vhost_path=missing)


def test_auto_falls_back_to_userspace_with_a_warning_when_the_node_is_unusable(tmp_path, caplog):
    node = tmp_path / "vhost-vsock"
    node.write_bytes(b"")  # exists, but answers no VHOST_* ioctl
    with caplog.at_level(logging.WARNING, logger="kvmpy.virtio"):
        dev = vsock_device(3, vhost_path=str(node), uds_path=tmp_path / "v.sock")
    try:
        assert dev.backend == "userspace"
        assert "not a vhost-vsock device" in caplog.text and "using the userspace back end" in caplog.text
    finally:
        dev.close()


def test_userspace_requested_never_looks_at_vhost(tmp_path):
    node = tmp_path / "vhost-vsock"
    node.write_bytes(b"")
    dev = vsock_device(3, backend="userspace", vhost_path=str(node), uds_path=tmp_path / "v.sock")
    dev.close()
    assert dev.backend == "userspace"


def test_userspace_without_a_socket_path_gets_the_default(absent_node):
    dev = vsock_device(3, backend="userspace")
    assert dev.uds_path == vsock.default_uds_path()
    dev.close()


def test_an_unknown_backend_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="vsock backend 'qemu': choose one of auto, vhost, userspace"):
        vsock_device(3, backend="qemu")


def test_a_reserved_cid_is_refused_before_any_back_end_is_opened(absent_node):
    with pytest.raises(ValueError, match="vsock guest CID 2: must be above 2"):
        vsock_device(2, backend="vhost")


def test_both_back_ends_share_the_device_type_and_configuration_space(tmp_path):
    dev = VsockDevice(tmp_path / "v.sock", 0x1234_5678)
    assert isinstance(dev, VirtioVsock)
    assert dev.device_id == 19 and len(dev.queue_sizes) == 3
    assert dev.config_space() == (0x1234_5678).to_bytes(8, "little")  # struct virtio_vsock_config
    dev.close()


# -- `kvmpy run --vsock CID[,backend=...]` and config objects ------------------------------

def test_vsock_argument_keeps_the_plain_cid_form():
    from kvmpy.machine import VsockConfig
    assert VsockConfig.parse("3") == VsockConfig(3, "auto")
    assert VsockConfig.parse("7,backend=vhost") == VsockConfig(7, "vhost")
    assert VsockConfig.parse("7,backend=userspace") == VsockConfig(7, "userspace")


@pytest.mark.parametrize("text, message", [
    ("x", "expected CID"),
    ("3,backend=qemu", "unknown option 'backend=qemu'"),
    ("3,uds=/tmp/v", "unknown option 'uds=/tmp/v'"),
])
def test_bad_vsock_argument_is_refused_naming_the_options(text, message):
    from kvmpy.machine import ConfigError, VsockConfig
    with pytest.raises(ConfigError, match=message):
        VsockConfig.parse(text)


def test_make_devices_takes_the_command_line_form(absent_node):
    from kvmpy.machine import MachineConfig, make_devices
    (dev,) = make_devices(MachineConfig(kernel=None, vsock="9,backend=userspace"))
    dev.close()
    assert (dev.backend, dev.guest_cid) == ("userspace", 9)


def test_make_devices_vhost_without_the_node_fails_before_any_vm(absent_node):
    from kvmpy.machine import MachineConfig, VsockConfig, make_devices
    with pytest.raises(VhostUnavailableError, match="vhost-vsock: no such device"):
        make_devices(MachineConfig(kernel=None, vsock=VsockConfig(3, backend="vhost"), rng=True))


def test_kvmpy_run_reports_a_missing_vhost_vsock_before_booting(absent_node, capsys, tmp_path):
    import struct

    from kvmpy.cli import main

    # A multiboot kernel that is only a header (a.out kludge): it passes the image checks, then the device fails.
    magic, flags = 0x1BADB002, 0x0001_0000
    kernel = tmp_path / "mb"
    kernel.write_bytes(struct.pack("<8I", magic, flags, -(magic + flags) & 0xFFFFFFFF,
                                   0x100000, 0x100000, 0x100020, 0x100020, 0x100020) + bytes(4096))
    assert main(["run", "--kernel", str(kernel), "--mem", "64M", "--vsock", "3,backend=vhost"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"kvmpy: {absent_node}: no such device") and "modprobe vhost_vsock" in err
