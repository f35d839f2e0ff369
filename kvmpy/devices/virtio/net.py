"""virtio-net on a TAP file descriptor (virtio 1.2 section 5.1).

Two queues: receiveq (0) and transmitq (1). With VIRTIO_F_VERSION_1 every
packet is preceded by the 12-byte `struct virtio_net_hdr` (flags, gso_type,
hdr_len, gso_size, csum_start, csum_offset, num_buffers). The TAP is
opened with IFF_VNET_HDR and a header size of 12, so the bytes in a guest
buffer are exactly the bytes the TAP reads or writes: transmit is one
`writev` of the chain's readable views, receive one `readv` into its
writable views, then `num_buffers` = 1 (the TAP leaves that field alone).
Transmit offloads are offered (CSUM, HOST_TSO4, HOST_TSO6): the guest may
hand over TCP frames of up to 64 KiB with a partial checksum, and the TAP
takes them as they are, segmenting and checksumming in the host kernel.
No receive offloads: the TAP gets no TUNSETOFFLOAD, so frames to the guest
are plain, checksummed and at most one MTU, and fit Linux's small buffers.

Receive back-pressure: when the TAP has frames but the guest has posted no
receive buffers, the TAP fd is taken out of the I/O thread's poll set
(otherwise a level-triggered epoll would spin) and put back when the
driver notifies receiveq. Frames wait in the TAP's own queue meanwhile.

Any fd with packet semantics works as the back end: a TAP, or one end of a
`socketpair(AF_UNIX, SOCK_SEQPACKET)` in tests.
"""

from __future__ import annotations

import os
import re
import select
import struct
from typing import TYPE_CHECKING, Any

from .mmio import (VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, DeviceId, SnapshotRefused,
                   VirtioDevice)

if TYPE_CHECKING:
    from .iothread import IoThread

VIRTIO_NET_F_CSUM = 1 << 0        # the device completes the guest's partial checksums
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_HOST_TSO4 = 1 << 11  # the device takes TCP/IPv4 frames of up to 64 KiB to segment
VIRTIO_NET_F_HOST_TSO6 = 1 << 12
VIRTIO_NET_F_STATUS = 1 << 16
# Transmit offloads: the TAP takes GSO frames with partial checksums as they are
# (its vnet header carries csum_start/offset and gso_type/size), so offering them
# costs the device nothing and saves the guest the checksum and per-segment work
# -- emulated kernel code on the PVM backend.
TX_OFFLOADS = VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6
VIRTIO_NET_S_LINK_UP = 1

NET_HDR_SIZE = 12
QUEUE_SIZE = 256
RX, TX = 0, 1
MAX_FRAME = 65562  # 64 KiB + Ethernet/VLAN header: the largest (GSO) frame either way
_BATCH = 64        # frames per wakeup before giving other sources a turn


def parse_mac(mac: str | bytes) -> bytes:
    """'52:54:00:12:34:56' or 6 bytes -> 6 bytes; refuses multicast addresses."""
    if isinstance(mac, (bytes, bytearray)):
        raw = bytes(mac)
    else:
        if not re.fullmatch(r"([0-9a-fA-F]{2}[:-]){5}[0-9a-fA-F]{2}", mac):
            raise ValueError(f"MAC address {mac!r}: expected six hex pairs like 52:54:00:12:34:56")
        raw = bytes(int(x, 16) for x in re.split("[:-]", mac))
    if len(raw) != 6:
        raise ValueError(f"MAC address {raw!r}: must be 6 bytes")
    if raw[0] & 1:
        raise ValueError(f"MAC address {raw.hex(':')}: multicast bit set; use a unicast address")
    return raw


def random_mac() -> bytes:
    """A locally administered unicast MAC (the 0x02 bit), like QEMU's 52:54:00 prefix style."""
    return bytes([0x52, 0x54, 0x00]) + os.urandom(3)


class NetDevice(VirtioDevice):
    """virtio-net over `fd` (a TAP opened with IFF_VNET_HDR and a 12-byte header).

    `owner`, if given (for example the `Tap`), is closed with the device.
    """

    device_id = DeviceId.NET
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    features = (VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX
                | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | TX_OFFLOADS)

    def __init__(self, fd: int, mac: str | bytes | None = None, *, owner: Any = None,
                 tx_offloads: bool = True) -> None:
        super().__init__()
        if not tx_offloads:
            self.features = self.features & ~TX_OFFLOADS
        self.fd = fd
        self.owner = owner
        self.mac = parse_mac(mac) if mac is not None else random_mac()
        self.iothread: IoThread | None = None
        self._rx_polling = False
        self.rx_packets = self.tx_packets = 0
        self.rx_bytes = self.tx_bytes = 0
        self.tx_errors = 0
        self.rx_short = 0  # receive buffers too small for the header

    def config_space(self) -> bytes:
        # struct virtio_net_config: mac, status, max_virtqueue_pairs (5.1.4).
        return self.mac + struct.pack("<HH", VIRTIO_NET_S_LINK_UP, 1)

    # -- I/O thread ----------------------------------------------------------

    def start_io(self, iothread: IoThread) -> None:
        self.iothread = iothread
        iothread.add(self.fd, self._on_readable, 0)  # quiet until the driver is ready

    def _poll_rx(self, on: bool) -> None:
        if self.iothread is not None and on != self._rx_polling:
            self._rx_polling = on
            self.iothread.modify(self.fd, select.EPOLLIN if on else 0)

    def _on_readable(self, _events: int) -> None:
        if self.transport is not None:
            self.transport.run(self._receive)

    # -- device --------------------------------------------------------------

    def activate(self) -> None:
        self.queues[TX].max_chain_bytes = NET_HDR_SIZE + MAX_FRAME
        self.queues[RX].max_chain_bytes = 16 * (NET_HDR_SIZE + MAX_FRAME)
        self._poll_rx(True)

    def reset(self) -> None:
        self._poll_rx(False)

    def process_queue(self, index: int) -> None:
        if index == RX:
            self._poll_rx(True)
            self._receive()
        elif index == TX:
            self._transmit()

    def _transmit(self) -> None:
        q = self.queues[TX]
        for chain in self.chains(q):
            if chain.readable_len <= NET_HDR_SIZE or chain.writable:
                self.tx_errors += 1  # no frame after the header, or a writable buffer on transmitq
            else:
                try:
                    os.writev(self.fd, chain.readable)
                    self.tx_packets += 1
                    self.tx_bytes += chain.readable_len - NET_HDR_SIZE
                except OSError:
                    self.tx_errors += 1  # TAP down or its queue full: the frame is dropped, as a NIC would
            q.add_used(chain.head, 0)
        self.signal_used(q)  # a no-op unless entries were added (malformed chains included)

    def _receive(self) -> None:
        q = self.queues[RX]
        served = 0
        try:
            while served < _BATCH:
                chain = next(self.chains(q), None)
                if chain is None:
                    # No buffers: stop polling the TAP until the driver posts some.
                    self._poll_rx(False)
                    if q.has_pending():  # posted meanwhile, before the notify we rely on
                        self._poll_rx(True)
                        continue
                    break
                if chain.writable_len < NET_HDR_SIZE or chain.readable:
                    self.rx_short += 1
                    q.add_used(chain.head, 0)
                    served += 1
                    continue
                try:
                    n = os.readv(self.fd, chain.writable)
                except (BlockingIOError, InterruptedError):
                    q.undo_pop()
                    break
                except OSError:
                    q.undo_pop()
                    self._poll_rx(False)
                    break
                n = min(n, chain.writable_len)
                chain.write(b"\x01\x00", skip=10)  # num_buffers = 1
                q.add_used(chain.head, n)
                self.rx_packets += 1
                self.rx_bytes += max(n - NET_HDR_SIZE, 0)
                served += 1
        finally:
            self.signal_used(q)

    def snapshot_config(self) -> dict:
        """MAC and the TAP's host-side configuration; a restored device gets a fresh TAP like it.

        The TAP name is recorded but not reused: a clone cannot share the
        original's interface, so restore creates a generated one.
        """
        tap = self.owner
        if tap is None or not hasattr(tap, "host_address"):
            raise SnapshotRefused(f"{self.name}: back end is a bare fd (fd {self.fd}), not a kvmpy Tap; "
                                  "restore could not recreate it")
        return {"kind": "net", "mac": self.mac.hex(":"), "tap": tap.name, "host_address": tap.host_address,
                "bridge": tap.bridge, "tx_offloads": bool(self.features & TX_OFFLOADS)}

    def close(self) -> None:
        if self.iothread is not None:
            self.iothread.remove(self.fd)
            self.iothread = None
        if self.owner is not None:
            self.owner.close()
            self.owner = None

    def __repr__(self) -> str:
        return f"NetDevice(fd={self.fd}, mac={self.mac.hex(':')})"


__all__ = ["NET_HDR_SIZE", "NetDevice", "TX_OFFLOADS", "VIRTIO_NET_F_CSUM", "VIRTIO_NET_F_MAC",
           "VIRTIO_NET_F_STATUS", "parse_mac", "random_mac"]
