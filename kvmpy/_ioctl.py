"""The one place an ioctl is issued: `ioctl(fd, "KVM_X", arg)`.

Requests are looked up by their header name in the compiled cffi module, so
the name in an error message is exactly the ioctl that failed.
"""

from __future__ import annotations

from typing import Any

from ._kvm import ffi, lib
from .errors import KvmIoctlError

_NULL = ffi.NULL


def request(name: str) -> int:
    return getattr(lib, name)


def ioctl(fd: int, name: str, arg: Any = _NULL, detail: str = "") -> int:
    """Issue `name` with a pointer argument (a cffi object or NULL)."""
    r = lib.kvmpy_ioctl(fd, getattr(lib, name), arg)
    if r < 0:
        raise KvmIoctlError(name, -r, detail)
    return r


def ioctl_int(fd: int, name: str, arg: int = 0, detail: str = "") -> int:
    """Issue `name` with an integer argument (CHECK_EXTENSION, CREATE_VCPU, ...)."""
    r = lib.kvmpy_ioctl_int(fd, getattr(lib, name), arg)
    if r < 0:
        raise KvmIoctlError(name, -r, detail)
    return r
