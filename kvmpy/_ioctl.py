"""The one place an ioctl is issued: `ioctl(fd, "KVM_X", arg)`; and how device nodes are opened.

Requests are looked up by their header name in the compiled cffi module, so
the name in an error message is exactly the ioctl that failed.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ._kvm import ffi, lib
from .errors import KvmIoctlError

_NULL = ffi.NULL


def open_device(path: str, error: Callable[[str, OSError], Exception]) -> int:
    """A read-write, close-on-exec fd for the device node at `path`; `error(path, e)` is raised if it will not open."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise error(path, e) from None


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
