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
])
def test_bad_field_is_refused_naming_it(kernel, field, value, message):
    c = MicroVMConfig(kernel=kernel)
    setattr(c, field, value)
    with pytest.raises(ConfigError, match=message):
        c.validate()


def test_missing_kernel_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="kernel .*: no such file"):
        MicroVM(MicroVMConfig(kernel=tmp_path / "nope"))


def test_devices_the_machine_lacks_are_refused_only_when_asked_for(kernel, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    for name, value in (("disks", [DiskConfig(disk)]), ("nets", ["tap0"]), ("vsock", VsockConfig(3))):
        c = MicroVMConfig(kernel=kernel)
        setattr(c, name, value)
        if machine_supports(name):
            c.validate()
            assert getattr(c.machine_config(), name)
        else:
            with pytest.raises(ConfigError, match=f"{name}: this kvmpy's machine has no {name} support"):
                c.validate()
    MicroVMConfig(kernel=kernel).validate()  # none asked for: fine either way


def test_calls_out_of_order_raise_state_errors(kernel):
    vm = MicroVM(MicroVMConfig(kernel=kernel))
    assert vm.state == "created"
    with pytest.raises(VmStateError, match="pause\\(\\): the VM is created"):
        vm.pause()
    with pytest.raises(VmStateError, match="never started"):
        vm.wait(0)
    assert vm.stop().status.value == "stopped"
