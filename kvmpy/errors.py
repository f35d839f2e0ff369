"""The kvmpy exception hierarchy.

Every failed ioctl raises `KvmIoctlError` (or a subclass chosen by errno)
carrying the ioctl's name and the errno, so a message reads like
``KVM_SET_USER_MEMORY_REGION: EINVAL (Invalid argument)``.
"""

from __future__ import annotations

import errno as _errno
import os


class KvmError(Exception):
    """Base class of everything kvmpy raises."""


class KvmUnavailableError(KvmError):
    """/dev/kvm is missing or cannot be opened; the message says how to fix it."""


class KvmIoctlError(KvmError, OSError):
    """An ioctl on a KVM file descriptor failed."""

    def __init__(self, ioctl: str, err: int, detail: str = "") -> None:
        self.ioctl = ioctl
        name = _errno.errorcode.get(err, str(err))
        msg = f"{ioctl}: {name} ({os.strerror(err)})"
        if detail:
            msg += f": {detail}"
        OSError.__init__(self, err, msg)
        self.errno = err

    def __str__(self) -> str:
        return self.strerror or ""


class VhostUnavailableError(KvmError):
    """/dev/vhost-vsock is missing, cannot be opened, or is not vhost-vsock; the message says how to fix it."""


class VsockCidInUseError(KvmIoctlError):
    """VHOST_VSOCK_SET_GUEST_CID failed with EADDRINUSE: another VM on this host has that guest CID."""


class CapabilityError(KvmError):
    """A KVM capability the caller needs is not offered by this kernel."""


class GuestMemoryError(KvmError):
    """A guest-physical access outside guest RAM, or a bad memory layout."""


class PageFault(GuestMemoryError):
    """A guest page walk that the CPU would end with #PF: `address` (CR2) and `error_code` (SDM vol. 3A, 4.7)."""

    def __init__(self, address: int, error_code: int, message: str) -> None:
        super().__init__(message)
        self.address = address
        self.error_code = error_code


class BusError(KvmError):
    """A device-bus registration conflict."""


class GuestError(KvmError):
    """The guest stopped in a way the VMM cannot continue from.

    Carries what a person needs to see: the vCPU, RIP, CPU mode and the
    instruction bytes where known.
    """

    def __init__(self, message: str, *, vcpu: int | None = None, rip: int | None = None,
                 mode: str | None = None, insn: bytes | None = None,
                 disassembly: str | None = None) -> None:
        parts = [message]
        if vcpu is not None:
            parts.append(f"vcpu {vcpu}")
        if rip is not None:
            parts.append(f"rip {rip:#x}")
        if mode:
            parts.append(f"mode {mode}")
        if insn:
            parts.append(f"bytes {insn.hex(' ')}")
        if disassembly:
            parts.append(f"insn '{disassembly}'")
        super().__init__(", ".join(parts))
        self.vcpu = vcpu
        self.rip = rip
        self.mode = mode
        self.insn = insn
        self.disassembly = disassembly


class SnapshotError(KvmError):
    """A snapshot (or a component's saved state) cannot be taken, read or restored; the message says why."""


class SnapshotVersionError(SnapshotError):
    """The state was written by another format version or an incompatible kvmpy build."""


class SnapshotCorruptError(SnapshotError):
    """A snapshot file is missing, truncated, or does not match its checksum."""


class BootError(KvmError):
    """A kernel, initrd or command line that cannot be booted (checked before any VM exists)."""


def device_open_error(path: str, e: OSError, hints: dict[int, str], error: type[KvmError]) -> KvmError:
    """`error` naming `path` and what to do about `e`: the hint for its errno, else the system's text."""
    return error(f"{path}: {hints.get(e.errno or 0, e.strerror or str(e))}")
