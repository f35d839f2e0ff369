"""MicroVMConfig validation: every bad field is refused up front, naming the field. No /dev/kvm needed."""

from __future__ import annotations

import pytest

from kvmpy.microvm import (ConfigError, DiskConfig, MicroVM, MicroVMConfig, NetConfig, VmStateError, VsockConfig,
                           machine_supports)


@pytest.fixture
def kernel(tmp_path):
    k = tmp_path / "vmlinux"
    k.write_bytes(b"\x7fELF")
    return k


def test_a_good_config_is_normalized(kernel):
    c = MicroVMConfig(kernel=str(kernel), memory="64M", vcpus=2)
    c.validate()
    assert c.memory == 64 << 20 and c.kernel == kernel


@pytest.mark.parametrize("field, value, message", [
    ("memory", "16M", "memory: 16 MiB is too small"),
    ("memory", "lots", "memory: not a memory size"),
    ("memory", 10**15, "more than this host has"),
    ("vcpus", 0, "vcpus: 0"),
    ("vcpus", 1000, "vcpus: 1000"),
    ("cmdline", "a\0b", "cmdline: must be a string without NUL"),
    ("cmdline", "x" * 2000, "cmdline: 2000 bytes"),
    ("quirks", "fast", "quirks: 'fast'"),
    ("initrd", "/no/such/initrd", "initrd '/no/such/initrd': no such file"),
    ("disks", ["/no/such/disk.img"], r"disks\[0\] '/no/such/disk.img': no such file"),
    ("nets", ["this-name-is-far-too-long"], r"nets\[0\] tap 'this-name-is-far-too-long'"),
    ("nets", [NetConfig(tap="tap0", mac="zz:zz")], r"nets\[0\] mac 'zz:zz'"),
    ("vsock", 2, "vsock: guest CID 2"),
    ("vsock", VsockConfig(3, backend="qemu"), "vsock: backend 'qemu'; one of 'auto', 'vhost', 'userspace'"),
])
def test_bad_field_is_refused_naming_it(kernel, field, value, message):
    c = MicroVMConfig(kernel=kernel)
    setattr(c, field, value)
    with pytest.raises(ConfigError, match=message):
        c.validate()


def test_missing_kernel_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="kernel .*: no such file"):
        MicroVM(MicroVMConfig(kernel=tmp_path / "nope"))


def test_machine_config_makes_the_devices(kernel, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    for name in ("disks", "nets", "vsock"):
        assert machine_supports(name)
    c = MicroVMConfig(kernel=kernel, disks=[DiskConfig(disk, read_only=True)],
                      vsock=VsockConfig(3, backend="userspace"), rng=True)
    c.validate()
    devices = c.machine_config().devices
    try:
        assert [type(d).__name__ for d in devices] == ["BlockDevice", "EntropyDevice", "VsockDevice"]
        assert devices[0].path == disk and devices[0].read_only and devices[2].guest_cid == 3
    finally:
        for d in devices:
            d.close()
    assert MicroVMConfig(kernel=kernel).machine_config().devices == []


def test_vsock_backend_defaults_to_auto(kernel):
    c = MicroVMConfig(kernel=kernel, vsock=5)
    c.validate()
    assert c.vsock == VsockConfig(5, backend="auto")


def test_a_bad_image_fails_before_any_vm(kernel, tmp_path):
    small = tmp_path / "small.img"
    small.write_bytes(b"x" * 100)
    c = MicroVMConfig(kernel=kernel, disks=[small])
    c.validate()
    from kvmpy.storage import StorageError
    with pytest.raises(StorageError, match="smaller than one 512-byte sector"):
        c.machine_config()


def test_devices_are_closed_when_the_machine_cannot_be_built(kernel, tmp_path, monkeypatch):
    import kvmpy.microvm as microvm

    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    seen = []

    def failing_machine(config, **kw):
        seen.append(config)
        raise RuntimeError("no VM today")

    monkeypatch.setattr(microvm, "Machine", failing_machine)
    vm = MicroVM(MicroVMConfig(kernel=kernel, disks=[disk], rng=True))
    with pytest.raises(RuntimeError, match="no VM today"):
        vm.start()
    blk, rng = seen[0].devices
    assert blk.fd == -1  # the image was closed


def test_calls_out_of_order_raise_state_errors(kernel):
    vm = MicroVM(MicroVMConfig(kernel=kernel))
    assert vm.state == "created"
    with pytest.raises(VmStateError, match="pause\\(\\): the VM is created"):
        vm.pause()
    with pytest.raises(VmStateError, match="never started"):
        vm.wait(0)
    assert vm.stop().status.value == "stopped"
