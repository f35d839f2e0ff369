"""TAP devices for virtio-net: opened through /dev/net/tun, configured with pyroute2.

A `Tap` is one layer-2 interface on the host. kvmpy opens `/dev/net/tun`
with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (`TUNSETIFF`, Documentation/
networking/tuntap.rst) and sets a 12-byte vnet header (`TUNSETVNETHDRSZ`),
the size of virtio 1.x's `struct virtio_net_hdr` with `num_buffers`, so a
frame moves between the TAP and guest RAM with one readv/writev and no
rewriting. pyroute2 then gives the host side an address, brings the link
up and optionally enslaves it to a bridge.

Lifetime: the interface is not persistent, so the kernel deletes it when
its last file descriptor closes, which also happens when the kvmpy process
dies. `close()` deletes it explicitly. Persistent TAPs (`persist=True`,
for a TAP that must outlive one VM) would survive a crash; their names
carry the creating pid (`kvmpy<pid>-<n>`), and `cleanup_stale_taps()`,
run once per process before the first TAP is made, deletes every such
interface whose pid no longer exists.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import itertools
import os
import re
import struct
import threading

import psutil

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

# <asm-generic/ioctl.h>: _IOW(type, nr, size) for the <linux/if_tun.h> requests.
_IOC_WRITE = 1


def _iow(kind: str, nr: int, size: int) -> int:
    return (_IOC_WRITE << 30) | (size << 16) | (ord(kind) << 8) | nr


TUNSETIFF = _iow("T", 202, 4)        # _IOW('T', 202, int)
TUNSETPERSIST = _iow("T", 203, 4)    # _IOW('T', 203, int)
TUNSETVNETHDRSZ = _iow("T", 216, 4)  # _IOW('T', 216, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
VNET_HDR_SIZE = 12  # struct virtio_net_hdr_mrg_rxbuf / virtio 1.x virtio_net_hdr

NAME_PATTERN = re.compile(r"^kvmpy(\d+)-(\d+)$")

_counter = itertools.count()
_cleanup_done = False
_cleanup_lock = threading.Lock()


class TapError(OSError):
    """A TAP could not be created or configured; the message names it and the fix."""


def generated_name() -> str:
    """A fresh `kvmpy<pid>-<n>` not in use on this host."""
    with IPRoute() as ipr:
        while True:
            name = f"kvmpy{os.getpid()}-{next(_counter)}"
            if len(name) >= IFNAMSIZ:
                raise TapError(errno.ENAMETOOLONG, f"generated TAP name {name} is longer than 15 characters")
            if not ipr.link_lookup(ifname=name):
                return name



def cleanup_stale_taps() -> list[str]:
    """Delete every `kvmpy<pid>-<n>` interface whose pid is dead; returns their names."""
    removed = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME") or ""
            m = NAME_PATTERN.match(name)
            if m is None or psutil.pid_exists(int(m.group(1))):
                continue
            try:
                ipr.link("del", index=link["index"])
                removed.append(name)
            except NetlinkError as e:
                if e.code != errno.ENODEV:  # gone meanwhile: fine
                    raise TapError(e.code, f"TAP {name}: cannot delete stale interface: {e}") from e
    return removed


def _cleanup_once() -> None:
    global _cleanup_done
    with _cleanup_lock:
        if not _cleanup_done:
            _cleanup_done = True
            cleanup_stale_taps()


class Tap:
    """One TAP interface: the fd virtio-net reads and writes, and its host-side configuration.

    `host_address` is "ADDR/PREFIX" (e.g. "172.30.0.1/24") for the host end;
    `bridge` names an existing bridge to enslave the TAP to instead.
    """

    def __init__(self, name: str | None = None, *, host_address: str | None = None,
                 bridge: str | None = None, persist: bool = False, mtu: int | None = None) -> None:
        _cleanup_once()
        self.name = name or generated_name()
        if len(self.name.encode()) >= IFNAMSIZ:
            raise TapError(errno.EINVAL, f"TAP name {self.name!r} is longer than 15 bytes")
        self.persist = persist
        self.fd = -1
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TapError(e.errno, f"/dev/net/tun: {e.strerror}; TAP devices need CAP_NET_ADMIN "
                                    "(run as root) and the tun module (modprobe tun)") from e
        try:
            ifr = struct.pack(f"{IFNAMSIZ}sH22x", self.name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            try:
                fcntl.ioctl(self.fd, TUNSETIFF, ifr)
            except OSError as e:
                raise TapError(e.errno, f"TUNSETIFF {self.name}: {e.strerror}"
                               + ("; the name is taken by a non-TAP interface or another process"
                                  if e.errno in (errno.EBUSY, errno.EINVAL) else "")) from e
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
            if persist:
                fcntl.ioctl(self.fd, TUNSETPERSIST, 1)
            self._configure(host_address, bridge, mtu)
        except BaseException:
            self.close()
            raise
        self.host_address = host_address
        self.bridge = bridge

    def _configure(self, host_address: str | None, bridge: str | None, mtu: int | None) -> None:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=self.name)
            if not found:
                raise TapError(errno.ENODEV, f"TAP {self.name}: created but not visible over netlink")
            self.index = found[0]
            try:
                if host_address is not None:
                    iface = ipaddress.ip_interface(host_address)
                    ipr.addr("add", index=self.index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
                if mtu is not None:
                    ipr.link("set", index=self.index, mtu=mtu)
                if bridge is not None:
                    master = ipr.link_lookup(ifname=bridge)
                    if not master:
                        raise TapError(errno.ENODEV, f"bridge {bridge}: no such interface; create it with "
                                                     f"`ip link add {bridge} type bridge`")
                    ipr.link("set", index=self.index, master=master[0])
                ipr.link("set", index=self.index, state="up")
            except NetlinkError as e:
                raise TapError(e.code, f"TAP {self.name}: configuring {host_address or ''} "
                                       f"{bridge or ''}: {e}") from e

    def close(self) -> None:
        """Delete the interface and close the fd."""
        if self.fd >= 0:
            try:
                with IPRoute() as ipr:
                    for index in ipr.link_lookup(ifname=self.name):
                        ipr.link("del", index=index)
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise
            finally:
                os.close(self.fd)
                self.fd = -1

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tap({self.name}, fd={self.fd})"


def link_exists(name: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


__all__ = ["Tap", "TapError", "VNET_HDR_SIZE", "cleanup_stale_taps", "generated_name", "link_exists"]
