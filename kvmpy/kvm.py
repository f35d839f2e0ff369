"""`Kvm`: the system file descriptor, /dev/kvm.

One method per system ioctl (KVM API document, section 4), named after it.
"""

from __future__ import annotations

import enum
import errno
import os
from dataclasses import dataclass

from ._ioctl import ioctl, ioctl_int, open_device
from ._kvm import ffi, lib
from .errors import CapabilityError, KvmError, KvmIoctlError, KvmUnavailableError, device_open_error
from .vm import Vm

DEFAULT_DEVICE = "/dev/kvm"

# Every KVM_CAP_* the compiled header knows, as an enum (values from the header).
Capability = enum.IntEnum(  # type: ignore[misc]
    "Capability",
    sorted(((n[len("KVM_CAP_"):], getattr(lib, n)) for n in dir(lib) if n.startswith("KVM_CAP_")),
           key=lambda kv: kv[1]),
)
Capability.__doc__ = "KVM capabilities (KVM_CAP_*), for `Kvm.check_extension`."


@dataclass(frozen=True)
class CpuidEntry:
    """One leaf of a CPUID table (struct kvm_cpuid_entry2)."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


_OPEN_HINTS = {
    errno.ENOENT: "the kvm module is not loaded or this machine has no virtualization: "
                  "run 'modprobe kvm_intel' (or kvm_amd), and enable VT-x/AMD-V in firmware",
    errno.EACCES: "permission denied; add your user to group kvm "
                  "('sudo usermod -aG kvm $USER', then log in again) or run as root",
}
_OPEN_HINTS[errno.EPERM] = _OPEN_HINTS[errno.EACCES]


def _open_error(path: str, e: OSError) -> KvmError:
    return device_open_error(path, e, _OPEN_HINTS, KvmUnavailableError)


class Kvm:
    """The KVM subsystem (/dev/kvm): capabilities, CPUID and MSR lists, VM creation."""

    def __init__(self, path: str = DEFAULT_DEVICE) -> None:
        self.path = path
        self.fd = open_device(path, _open_error)
        try:
            version = self.get_api_version()
        except KvmIoctlError as e:
            os.close(self.fd)
            raise KvmUnavailableError(f"{path}: not a KVM device ({e})") from None
        if version != lib.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailableError(
                f"{path}: KVM API version {version}, kvmpy needs {lib.KVM_API_VERSION}")
        self._vcpu_mmap_size: int | None = None

    # -- ioctls ---------------------------------------------------------------

    def get_api_version(self) -> int:
        """KVM_GET_API_VERSION: 12 on every kernel since 2.6.22."""
        return ioctl_int(self.fd, "KVM_GET_API_VERSION")

    def check_extension(self, cap: Capability | int) -> int:
        """KVM_CHECK_EXTENSION: 0 if absent, else 1 or a capability-specific value."""
        return ioctl_int(self.fd, "KVM_CHECK_EXTENSION", int(cap))

    def require(self, cap: Capability) -> int:
        """`check_extension`, raising `CapabilityError` when the capability is absent."""
        value = self.check_extension(cap)
        if not value:
            raise CapabilityError(f"{self.path}: KVM_CAP_{cap.name} is not supported by this kernel")
        return value

    @property
    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to mmap for a vCPU's kvm_run area."""
        if self._vcpu_mmap_size is None:
            self._vcpu_mmap_size = ioctl_int(self.fd, "KVM_GET_VCPU_MMAP_SIZE")
        return self._vcpu_mmap_size

    def _get_cpuid(self, name: str) -> list[CpuidEntry]:
        n = 64
        while True:
            cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
            try:
                ioctl(self.fd, name, cpuid)
            except KvmIoctlError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                    for e in cpuid.entries[0:cpuid.nent]]

    def get_supported_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can present to a guest."""
        return self._get_cpuid("KVM_GET_SUPPORTED_CPUID")

    def get_emulated_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_EMULATED_CPUID: features KVM emulates in software."""
        return self._get_cpuid("KVM_GET_EMULATED_CPUID")

    def _get_msr_list(self, name: str) -> list[int]:
        probe = ffi.new("struct kvm_msr_list *", {"nmsrs": 0, "indices": 0})
        try:
            ioctl(self.fd, name, probe)
        except KvmIoctlError as e:
            if e.errno != errno.E2BIG:
                raise
        n = probe.nmsrs
        msrs = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
        ioctl(self.fd, name, msrs)
        return list(msrs.indices[0:msrs.nmsrs])

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: MSRs saved and restored with a vCPU's state."""
        return self._get_msr_list("KVM_GET_MSR_INDEX_LIST")

    def get_msr_feature_index_list(self) -> list[int]:
        """KVM_GET_MSR_FEATURE_INDEX_LIST: feature MSRs readable on the system fd."""
        return self._get_msr_list("KVM_GET_MSR_FEATURE_INDEX_LIST")

    def create_vm(self, machine_type: int = 0) -> Vm:
        """KVM_CREATE_VM: a new, empty virtual machine."""
        fd = ioctl_int(self.fd, "KVM_CREATE_VM", machine_type)
        return Vm(fd, vcpu_mmap_size=self.vcpu_mmap_size, system=self)

    # -- lifetime -------------------------------------------------------------

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Kvm({self.path!r}, fd={self.fd})"


def kvm_available(path: str = DEFAULT_DEVICE) -> str | None:
    """None when `path` can be opened read-write, else the reason it cannot."""
    try:
        Kvm(path).close()
    except KvmUnavailableError as e:
        return str(e)
    return None

