"""MachineConfig (= MicroVMConfig) validation: every bad field is refused up front, naming the field. No /dev/kvm."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from kvmpy.machine import (ConfigError, DeviceError, DiskConfig, MachineConfig, ModuleConfig, NetConfig, VsockConfig,
                           make_devices)
from kvmpy.microvm import MicroVM, MicroVMConfig, VmStateError


@pytest.fixture
def kernel(tmp_path):
    k = tmp_path / "vmlinux"
    k.write_bytes(b"\x7fELF")
    return k


def test_one_config_type_describes_a_machine_for_every_front_end():
    assert MicroVMConfig is MachineConfig


def test_a_good_config_is_normalized_into_a_new_frozen_one(kernel):
    c = MachineConfig(kernel=str(kernel), memory="64M", vcpus=2, disks=[str(kernel)])
    v = c.validate()
    assert v.memory == 64 << 20 and v.kernel == kernel and v.disks == (DiskConfig(kernel),)
    assert c.memory == "64M"  # the original is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.memory = 1  # type: ignore[misc]


@pytest.mark.parametrize("field, value, message", [
    ("memory", "16M", "memory: 16 MiB is too small"),
    ("memory", "lots", "memory: not a memory size"),
    ("memory", 10**15, "more than this host has"),
    ("vcpus", 0, "vcpus: 0"),
    ("vcpus", 1000, "vcpus: 1000"),
    ("cmdline", "a\0b", "cmdline: must be a string without NUL"),
    ("cmdline", "x" * 2000, "cmdline: 2000 bytes"),
    ("quirks", "fast", "quirks: 'fast'"),
    ("entry", "uefi", "entry: 'uefi'"),
    ("initrd", "/no/such/initrd", "initrd '/no/such/initrd': no such file"),
    ("disks", ["/no/such/disk.img"], r"disks\[0\] '/no/such/disk.img': no such file"),
    ("disks", ["/tmp"], r"disks\[0\] '/tmp': is a directory"),
    ("nets", ["this-name-is-far-too-long"], r"nets\[0\] tap 'this-name-is-far-too-long'"),
    ("nets", [NetConfig(tap="tap0", mac="zz:zz")], r"nets\[0\] mac 'zz:zz'"),
    ("vsock", 2, "vsock: guest CID 2"),
    ("vsock", VsockConfig(3, backend="qemu"), "vsock: backend 'qemu'; one of 'auto', 'vhost', 'userspace'"),
    ("modules", [ModuleConfig(Path("/no/such/module"))], "multiboot module '/no/such/module'"),
    ("test_devices", ["vga"], "test_devices: unknown vga"),
])
def test_bad_field_is_refused_naming_it(kernel, field, value, message):
    with pytest.raises(ConfigError, match=message):
        MachineConfig(kernel=kernel, **{field: value}).validate()


def test_a_kernel_that_is_a_directory_is_named_so(tmp_path):
    with pytest.raises(ConfigError, match="kernel .*: is a directory"):
        MachineConfig(kernel=tmp_path).validate()


def test_missing_kernel_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="kernel .*: no such file"):
        MicroVM(MicroVMConfig(kernel=tmp_path / "nope"))
    with pytest.raises(ConfigError, match="kernel: required"):
        MachineConfig(kernel=None).validate()
    assert MachineConfig(kernel=None).validate(kernel_optional=True).kernel is None


def test_config_round_trips_through_its_dict(kernel, tmp_path):
    c = MachineConfig(kernel=kernel, memory="64M", vcpus=2, disks=[DiskConfig(kernel, True)],
                      nets=[NetConfig(mac="52:54:00:00:00:01", host_address="172.30.0.1/24")],
                      vsock=VsockConfig(5, "userspace", str(tmp_path / "v.sock")), rng=True,
                      test_devices=("debug-exit",)).validate()
    assert MachineConfig.from_dict(c.to_dict()) == c


def test_a_config_with_a_cpuid_hook_cannot_be_recorded(kernel):
    with pytest.raises(ConfigError, match="cpuid"):
        MachineConfig(kernel=kernel, cpuid=lambda kvm, i, n: []).to_dict()


def test_command_line_grammar_lives_with_the_config():
    assert DiskConfig.parse("a.img,ro") == DiskConfig(Path("a.img"), True)
    assert NetConfig.parse("tap=t0,ip=10.0.0.1/24") == NetConfig(tap="t0", host_address="10.0.0.1/24")
    assert VsockConfig.parse("3,backend=userspace") == VsockConfig(3, "userspace")
    assert ModuleConfig.parse("env,the string") == ModuleConfig(Path("env"), "the string")


def test_make_devices_makes_the_configs_devices_in_attach_order(kernel, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    c = MachineConfig(kernel=kernel, disks=[DiskConfig(disk, read_only=True)],
                      vsock=VsockConfig(3, backend="userspace", uds_path=str(tmp_path / "v.sock")), rng=True)
    devices = make_devices(c.validate())
    try:
        assert [type(d).__name__ for d in devices] == ["BlockDevice", "EntropyDevice", "VsockDevice"]
        assert devices[0].path == disk and devices[0].read_only and devices[2].guest_cid == 3
    finally:
        for d in devices:
            d.close()
    assert make_devices(MachineConfig(kernel=kernel)) == []


def test_vsock_backend_defaults_to_auto(kernel):
    assert MachineConfig(kernel=kernel, vsock=5).validate().vsock == VsockConfig(5, backend="auto")


def test_a_bad_image_fails_before_any_vm_naming_the_disk(kernel, tmp_path):
    small = tmp_path / "small.img"
    small.write_bytes(b"x" * 100)
    with pytest.raises(DeviceError, match=r"disks\[0\] .*small.img.*smaller than one 512-byte sector"):
        make_devices(MachineConfig(kernel=kernel, disks=[small]).validate())


def test_devices_are_closed_when_the_machine_cannot_be_built(kernel, tmp_path):
    # The "kernel" is no kernel: the build fails after the devices were made.
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    before = len(os.listdir("/proc/self/fd"))
    vm = MicroVM(MicroVMConfig(kernel=kernel, disks=[disk], rng=True))
    with pytest.raises(Exception, match="vmlinux"):
        vm.start()
    assert len(os.listdir("/proc/self/fd")) == before


def test_calls_out_of_order_raise_state_errors(kernel):
    vm = MicroVM(MicroVMConfig(kernel=kernel))
    assert vm.state == "created"
    with pytest.raises(VmStateError, match="pause\\(\\): the VM is created"):
        vm.pause()
    with pytest.raises(VmStateError, match="never started"):
        vm.wait(0)
