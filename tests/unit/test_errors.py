"""Error messages: what failed and how to fix it."""

from __future__ import annotations

import errno
import mmap
import os

import pytest

import kvmpy
from kvmpy._kvm import ffi
from kvmpy.errors import KvmError, KvmIoctlError, KvmUnavailableError
from kvmpy.kvm import _open_error


def test_missing_device_says_the_module_is_not_loaded():
    with pytest.raises(KvmUnavailableError, match=r"^/nonexistent/kvm: the kvm module is not loaded.*modprobe"):
        kvmpy.Kvm("/nonexistent/kvm")


def test_kvm_available_returns_the_reason_for_a_missing_device():
    reason = kvmpy.kvm_available("/nonexistent/kvm")
    assert reason is not None and "modprobe" in reason


def test_permission_problem_says_to_join_group_kvm():
    # Tests may run as root, where no file refuses to open; check the message builder.
    e = _open_error("/dev/kvm", PermissionError(errno.EACCES, "Permission denied"))
    assert isinstance(e, KvmUnavailableError)
    assert str(e).startswith("/dev/kvm: permission denied; add your user to group kvm")


def test_eperm_is_reported_like_eacces():
    e = _open_error("/dev/kvm", PermissionError(errno.EPERM, "Operation not permitted"))
    assert "group kvm" in str(e)


def test_other_open_errors_keep_the_system_message():
    e = _open_error("/dev/kvm", OSError(errno.ENXIO, "No such device or address"))
    assert str(e) == "/dev/kvm: No such device or address"


def test_a_non_kvm_device_is_unavailable_naming_the_failed_ioctl():
    with pytest.raises(KvmUnavailableError, match=r"^/dev/null: not a KVM device \(KVM_GET_API_VERSION: ENOTTY"):
        kvmpy.Kvm("/dev/null")


def test_a_non_kvm_device_leaves_no_file_descriptor_open():
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(KvmUnavailableError):
        kvmpy.Kvm("/dev/null")
    assert set(os.listdir("/proc/self/fd")) <= before


def test_kvm_available_returns_a_reason_for_a_non_kvm_device():
    assert "not a KVM device" in kvmpy.kvm_available("/dev/null")


def test_ioctl_error_message_names_ioctl_errno_and_detail():
    e = KvmIoctlError("KVM_CREATE_VCPU", errno.EINVAL, "vcpu 9999")
    assert str(e) == "KVM_CREATE_VCPU: EINVAL (Invalid argument): vcpu 9999"
    assert (e.ioctl, e.errno) == ("KVM_CREATE_VCPU", errno.EINVAL)


def test_ioctl_error_is_an_oserror_and_a_kvm_error():
    e = KvmIoctlError("KVM_RUN", errno.EFAULT)
    assert isinstance(e, OSError) and isinstance(e, KvmError)


def test_unaligned_memory_region_fails_with_einval_naming_the_ioctl(kvm):
    backing = mmap.mmap(-1, 0x2000)
    try:
        with kvm.create_vm() as vm:
            buf = ffi.from_buffer(backing)
            addr = int(ffi.cast("uintptr_t", buf))
            ffi.release(buf)
            with pytest.raises(KvmIoctlError) as info:
                vm.set_user_memory_region(0, 0x1001, 0x1000, addr)
    finally:
        backing.close()
    assert (info.value.ioctl, info.value.errno) == ("KVM_SET_USER_MEMORY_REGION", errno.EINVAL)
    assert str(info.value) == ("KVM_SET_USER_MEMORY_REGION: EINVAL (Invalid argument): "
                               "slot 0 at 0x1001 size 0x1000")


def test_creating_the_same_vcpu_twice_says_it_exists(kvm):
    with kvm.create_vm() as vm:
        vm.create_vcpu(0)
        with pytest.raises(KvmError, match="vcpu 0 already exists"):
            vm.create_vcpu(0)


def _kvmpy_modules():
    import importlib
    import pkgutil
    for info in pkgutil.walk_packages(kvmpy.__path__, "kvmpy."):
        if info.name.rsplit(".", 1)[-1].startswith("_build"):
            continue  # cffi build scripts (setup time only): they define no API
        yield importlib.import_module(info.name)


def test_every_public_exception_of_the_package_is_a_kvm_error():
    import inspect
    modules = list(_kvmpy_modules())
    assert len(modules) > 40  # the walk reached the subpackages (devices.virtio, stats, x86, ...)
    outside = [f"{m.__name__}.{name}" for m in modules for name, cls in vars(m).items()
               if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == m.__name__
               and not name.startswith("_") and not issubclass(cls, KvmError)]
    assert not outside, f"public exceptions not derived from kvmpy.errors.KvmError: {outside}"


@pytest.mark.parametrize(("path", "second_base"), [
    ("kvmpy.guest.build.GuestBuildError", RuntimeError),
    ("kvmpy.disk.DiskImageError", RuntimeError),
    ("kvmpy.boot.initramfs.InitramfsError", ValueError),
    ("kvmpy.net.tap.TapError", OSError),
])
def test_errors_keep_their_standard_base_beside_kvm_error(path, second_base):
    import importlib
    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, KvmError) and issubclass(cls, second_base)
