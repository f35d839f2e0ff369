"""`VhostVsock`: the kernel's vhost-vsock back end, one file descriptor on /dev/vhost-vsock.

One method per ioctl, named after it (VHOST_SET_OWNER -> `set_owner`,
VHOST_VSOCK_SET_RUNNING -> `set_running`), as `Kvm` and `Vm` do for KVM;
the structures and numbers come from <linux/vhost.h> through the cffi
module. A failed ioctl raises `KvmIoctlError` naming it and the errno.

The kernel side is drivers/vhost/vsock.c. What it expects, in order:

1. open; VHOST_GET_FEATURES and VHOST_VSOCK_SET_GUEST_CID need no owner
   (the CID is claimed on this host from then until close);
2. VHOST_SET_OWNER: binds the fd to this process's memory and starts the
   kernel worker; every other VHOST_* ioctl fails with EPERM before it;
3. VHOST_SET_FEATURES, VHOST_SET_MEM_TABLE (guest-physical -> this
   process's addresses), then per vring VHOST_SET_VRING_NUM/BASE/ADDR
   (ring addresses are host virtual addresses)/KICK/CALL/ERR;
4. VHOST_VSOCK_SET_RUNNING 1. The vring ioctls answer EBUSY while running;
   SET_RUNNING 0 stops the vrings; close releases the CID and resets the
   host sockets connected to it.

The vrings are the guest's rxq (0) and txq (1): vhost-vsock has no event queue.

`BackendVrings` is what every back end outside kvmpy needs from the
transport, whether it is the kernel (vhost-vsock) or another process
(vhost-user, kvmpy/devices/virtio/vhost_user.py): the queues' KVM
ioeventfds as kick fds, and call eventfds the I/O thread turns into
used-buffer interrupts (why those cannot be irqfds on virtio-mmio: see
`BackendVrings`).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from ..._ioctl import ioctl, ioctl_int, open_device
from ..._kvm import ffi
from ...errors import KvmError, KvmIoctlError, VhostUnavailableError, VsockCidInUseError, device_open_error
from ...memory import GuestMemory

if TYPE_CHECKING:
    from .iothread import IoThread
    from .mmio import MmioTransport

VHOST_VSOCK_PATH = "/dev/vhost-vsock"


@dataclass(frozen=True)
class VhostMemoryRegion:
    """One entry of VHOST_SET_MEM_TABLE (struct vhost_memory_region)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int


def memory_table(memory: GuestMemory) -> list[VhostMemoryRegion]:
    """Every region of guest RAM with the host address of its mapping, in address order."""
    return [VhostMemoryRegion(r.gpa, r.size, r.host_address) for r in memory]


_OPEN_HINTS = {
    errno.ENOENT: "no such device; load the kernel module with 'modprobe vhost_vsock' "
                  "(or use the userspace vsock back end: backend=userspace)",
    errno.EACCES: "permission denied; run as root or give your user the device "
                  "(e.g. 'chgrp kvm /dev/vhost-vsock; chmod 660 /dev/vhost-vsock', or a udev rule)",
    errno.ENODEV: "the device node exists but no driver answers; load it with 'modprobe vhost_vsock'",
}
_OPEN_HINTS[errno.EPERM] = _OPEN_HINTS[errno.EACCES]
_OPEN_HINTS[errno.ENXIO] = _OPEN_HINTS[errno.ENODEV]


def _open_error(path: str, e: OSError) -> KvmError:
    return device_open_error(path, e, _OPEN_HINTS, VhostUnavailableError)


class VhostVsock:
    """An open /dev/vhost-vsock: one guest's vsock device in the host kernel."""

    def __init__(self, path: str = VHOST_VSOCK_PATH) -> None:
        self.path = path
        self.fd = open_device(path, _open_error)
        try:
            self._features = self.get_features()
        except KvmIoctlError as e:
            os.close(self.fd)
            self.fd = -1
            raise VhostUnavailableError(f"{path}: not a vhost-vsock device ({e})") from None

    @property
    def features(self) -> int:
        """What VHOST_GET_FEATURES said when the device was opened."""
        return self._features

    # -- ioctls ---------------------------------------------------------------

    def get_features(self) -> int:
        """VHOST_GET_FEATURES: the virtio feature bits the kernel's device implements."""
        value = ffi.new("__u64 *")
        ioctl(self.fd, "VHOST_GET_FEATURES", value)
        return int(value[0])

    def set_features(self, features: int) -> None:
        """VHOST_SET_FEATURES: the features the driver acknowledged (a subset of `get_features`)."""
        ioctl(self.fd, "VHOST_SET_FEATURES", ffi.new("__u64 *", features), f"features {features:#x}")

    def set_owner(self) -> None:
        """VHOST_SET_OWNER: this process (its memory) owns the device; starts the kernel worker."""
        ioctl_int(self.fd, "VHOST_SET_OWNER")

    def reset_owner(self) -> None:
        """VHOST_RESET_OWNER: drop the owner, memory table and vrings (not every kernel's vsock has it)."""
        ioctl_int(self.fd, "VHOST_RESET_OWNER")

    def set_mem_table(self, regions: Iterable[VhostMemoryRegion]) -> None:
        """VHOST_SET_MEM_TABLE: how guest-physical addresses map to this process's addresses."""
        regions = list(regions)
        table = ffi.new("struct vhost_memory *", {"nregions": len(regions), "regions": len(regions)})
        for i, r in enumerate(regions):
            e = table.regions[i]
            e.guest_phys_addr, e.memory_size, e.userspace_addr = r.guest_phys_addr, r.memory_size, r.userspace_addr
        ioctl(self.fd, "VHOST_SET_MEM_TABLE", table, f"{len(regions)} region(s)")

    def set_vring_num(self, index: int, num: int) -> None:
        """VHOST_SET_VRING_NUM: the queue size the driver chose."""
        self._vring_state("VHOST_SET_VRING_NUM", index, num)

    def set_vring_base(self, index: int, base: int) -> None:
        """VHOST_SET_VRING_BASE: the next available-ring index the device will read."""
        self._vring_state("VHOST_SET_VRING_BASE", index, base)

    def get_vring_base(self, index: int) -> int:
        """VHOST_GET_VRING_BASE: where the device stopped in the available ring."""
        return self._vring_state("VHOST_GET_VRING_BASE", index, 0)

    def set_vring_addr(self, index: int, desc: int, avail: int, used: int) -> None:
        """VHOST_SET_VRING_ADDR: the three rings' host virtual addresses (no dirty logging)."""
        a = ffi.new("struct vhost_vring_addr *")
        a.index, a.flags = index, 0
        a.desc_user_addr, a.avail_user_addr, a.used_user_addr, a.log_guest_addr = desc, avail, used, 0
        ioctl(self.fd, "VHOST_SET_VRING_ADDR", a,
              f"vring {index}: desc {desc:#x}, avail {avail:#x}, used {used:#x}")

    def set_vring_kick(self, index: int, fd: int) -> None:
        """VHOST_SET_VRING_KICK: the eventfd the driver's notify signals (-1 unbinds)."""
        self._vring_file("VHOST_SET_VRING_KICK", index, fd)

    def set_vring_call(self, index: int, fd: int) -> None:
        """VHOST_SET_VRING_CALL: the eventfd the device signals when the driver wants an interrupt."""
        self._vring_file("VHOST_SET_VRING_CALL", index, fd)

    def set_vring_err(self, index: int, fd: int) -> None:
        """VHOST_SET_VRING_ERR: the eventfd the device signals when the guest broke the vring."""
        self._vring_file("VHOST_SET_VRING_ERR", index, fd)

    def set_guest_cid(self, cid: int) -> None:
        """VHOST_VSOCK_SET_GUEST_CID: the guest's context ID, unique on this host."""
        try:
            ioctl(self.fd, "VHOST_VSOCK_SET_GUEST_CID", ffi.new("__u64 *", cid), f"guest CID {cid}")
        except KvmIoctlError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise VsockCidInUseError("VHOST_VSOCK_SET_GUEST_CID", e.errno,
                                     f"guest CID {cid} is taken by another VM on this host "
                                     "(or by this host's own guest-side vsock); choose another CID") from None

    def set_running(self, running: bool) -> None:
        """VHOST_VSOCK_SET_RUNNING: start (checks the vrings against the memory table) or stop the device."""
        ioctl(self.fd, "VHOST_VSOCK_SET_RUNNING", ffi.new("int *", int(running)),
              "start" if running else "stop")

    def _vring_state(self, name: str, index: int, num: int) -> int:
        s = ffi.new("struct vhost_vring_state *")
        s.index, s.num = index, num
        ioctl(self.fd, name, s, f"vring {index}, {num}")
        return int(s.num)

    def _vring_file(self, name: str, index: int, fd: int) -> None:
        f = ffi.new("struct vhost_vring_file *")
        f.index, f.fd = index, fd
        ioctl(self.fd, name, f, f"vring {index}, fd {fd}")

    # -- lifetime ---------------------------------------------------------------

    def close(self) -> None:
        """Release the device: the kernel stops it, frees the CID and resets its host connections."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> VhostVsock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VhostVsock({self.path!r}, fd={self.fd})"


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class BackendVrings:
    """The eventfds of `count` vrings that a back end outside kvmpy serves (vhost-vsock, vhost-user).

    kick: the queue's KVM ioeventfd, claimed from the transport so a guest
    notify reaches the back end without waking Python (without ioeventfd,
    an eventfd of ours that `kick` signals from `process_queue`). call: an
    eventfd per vring that the I/O thread waits on and turns into an
    interrupt through the transport: on virtio-mmio it cannot be an irqfd,
    since Linux's vm_interrupt handles the vrings only when InterruptStatus
    has the used-buffer bit, which only the transport sets. err: the back
    end found the vring broken; `on_error(index)` decides what follows.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.call_fds = [_eventfd() for _ in range(count)]
        self.err_fds = [_eventfd() for _ in range(count)]
        self.kick_fds: dict[int, int] = {}  # vring -> kick fd, while the back end has the vring
        self.calls = 0  # call eventfd wakeups (interrupts the back end asked for)
        self._iothread: IoThread | None = None
        self._transport: MmioTransport | None = None

    def start_io(self, iothread: IoThread, transport: Callable[[], MmioTransport | None],
                 on_error: Callable[[int], None]) -> None:
        """Poll the call and err eventfds on the VM's I/O thread (`transport()`: the device's, when attached)."""
        self._iothread = iothread

        def called() -> None:
            self.calls += 1
            t = transport()
            if t is not None:
                t.raise_used_buffer()

        def errored(index: int) -> None:
            t = transport()
            if t is not None:
                t.run(on_error, index)

        for i in range(self.count):
            iothread.add_eventfd(self.call_fds[i], called)
            iothread.add_eventfd(self.err_fds[i], lambda i=i: errored(i))

    def take_kick(self, transport: MmioTransport, index: int) -> int:
        """The kick fd for vring `index`: its ioeventfd claimed from `transport`, or a fresh eventfd."""
        if index not in self.kick_fds:
            self._transport = transport
            kick = transport.claim_notify_fd(index)
            self.kick_fds[index] = kick if kick is not None else _eventfd()
        return self.kick_fds[index]

    def kick(self, index: int) -> None:
        """Pass on a notify that reached kvmpy (no ioeventfd, or one served at a fast-path switch)."""
        fd = self.kick_fds.get(index)
        if fd is not None:
            os.eventfd_write(fd, 1)

    def release_kicks(self) -> None:
        """The back end has stopped the vrings: the I/O thread polls their ioeventfds again."""
        for i, fd in self.kick_fds.items():
            os.close(fd)
            if self._transport is not None:
                self._transport.release_notify_fd(i)
        self.kick_fds.clear()

    def close(self) -> None:
        self.release_kicks()
        for fd in self.call_fds + self.err_fds:
            if self._iothread is not None:
                self._iothread.remove(fd)
            os.close(fd)
        self.call_fds, self.err_fds = [], []
        self._iothread = None


__all__ = ["BackendVrings", "VHOST_VSOCK_PATH", "VhostMemoryRegion", "VhostVsock", "memory_table"]
