"""The vhost-vsock back end against the host kernel's /dev/vhost-vsock, driven by the test driver.

The test driver (tests/virtio_driver.py) plays the guest's virtio_vsock:
it brings the device up through the transport's registers (DRIVER_OK
hands rxq and txq to the kernel), posts receive buffers and writes packets
to txq; the host side is real AF_VSOCK sockets connecting to the guest CID.
So every step of the ioctl sequence is exercised: the kernel reads our
descriptors through the memory table, kicks arrive through the eventfds,
and its call eventfds come back as interrupts through the I/O thread.

Skipped where /dev/vhost-vsock does not exist (load it with
`modprobe vhost_vsock`).
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time

import pytest

from kvmpy.devices.virtio.iothread import IoThread
from kvmpy.devices.virtio.mmio import VIRTIO_F_VERSION_1, MmioTransport, Register, SnapshotRefused
from kvmpy.devices.virtio.vsock import HDR, HDR_SIZE, HOST_CID, Op, VhostVsockDevice, vhost_vsock_available
from kvmpy.errors import VsockCidInUseError
from kvmpy.memory import GuestMemory
from virtio_driver import Driver
from vsock_client import set_connect_timeout, vhost_device_on_a_free_cid

pytestmark = pytest.mark.skipif(not vhost_vsock_available(),
                                reason="no /dev/vhost-vsock on this host (modprobe vhost_vsock)")

TYPE_STREAM = 1
GUEST_BUF = 64 << 10


def free_cid_device() -> VhostVsockDevice:
    return vhost_device_on_a_free_cid(0x1000_0000)


class Guest:
    """The guest driver's side: receive buffers on rxq, packets on txq, through the transport."""

    def __init__(self, drv: Driver, mem: GuestMemory, cid: int) -> None:
        self.drv, self.mem, self.cid = drv, mem, cid
        self.rx, self.tx = drv.queues[0], drv.queues[1]
        self.rx_bufs: dict[int, int] = {}
        for _ in range(8):
            self.post_rx()

    def post_rx(self) -> None:
        head, (addr,) = self.rx.add(in_lens=[HDR_SIZE + 4096], notify=False)
        self.rx_bufs[head] = addr
        self.rx.kick()

    def send(self, op: Op, src_port: int, dst_port: int, payload: bytes = b"") -> None:
        hdr = HDR.pack(self.cid, HOST_CID, src_port, dst_port, len(payload), TYPE_STREAM, op, 0, GUEST_BUF, 0)
        self.tx.add([hdr + payload])

    def packet(self, timeout: float = 10.0) -> tuple[tuple, bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for head, length in self.rx.used_entries():
                raw = self.mem.read(self.rx_bufs.pop(head), length)
                self.rx.recycle(head)
                self.post_rx()
                fields = HDR.unpack_from(raw)
                return fields, raw[HDR_SIZE:HDR_SIZE + fields[4]]
            time.sleep(0.01)
        raise AssertionError("no packet from vhost-vsock on rxq")


@pytest.fixture
def vhost():
    mem = GuestMemory(16 << 20)
    io = IoThread()
    dev = free_cid_device()
    interrupts: list[int] = []
    t = MmioTransport(dev, mem, lambda: interrupts.append(1))
    dev.start_io(io)
    io.start()
    drv = Driver(t, mem)
    drv.setup(features=VIRTIO_F_VERSION_1, queue_size=64)  # no EVENT_IDX: the kernel calls after each batch
    assert dev.running, t.last_error
    yield Guest(drv, mem, dev.guest_cid), dev, t, interrupts
    with t.lock:
        dev.close()
    io.close()
    mem.close()


def connect_in_thread(cid: int, port: int) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        set_connect_timeout(s, 10)  # the default 2 s is tight on a busy host
        start = time.monotonic()
        try:
            s.connect((cid, port))
            result["sock"] = s
        except OSError as e:
            result["errno"] = e.errno
            s.close()
        result["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_driver_ok_starts_the_kernel_device_with_the_offered_features(vhost):
    g, dev, t, _ = vhost
    assert dev.running and dev.vhost is not None
    assert dev.features & VIRTIO_F_VERSION_1 and dev.features & ~dev.vhost.features == 0
    assert g.drv.config(0, 8) == dev.guest_cid  # configuration space stays with kvmpy


def test_host_connect_to_a_port_nobody_listens_on_is_reset_by_the_guest(vhost):
    g, dev, t, interrupts = vhost
    thread, result = connect_in_thread(dev.guest_cid, 1234)
    (src_cid, dst_cid, src_port, dst_port, _, type_, op, *_), _ = g.packet()
    assert (src_cid, dst_cid, dst_port, type_, op) == (HOST_CID, dev.guest_cid, 1234, TYPE_STREAM, Op.REQUEST)
    assert interrupts and dev.calls >= 1  # the kernel's call eventfd became an interrupt
    assert t.interrupt_status & 1
    g.send(Op.RST, 1234, src_port)
    thread.join(10)
    assert result.get("errno") in (errno.ECONNRESET, errno.ECONNREFUSED), result


def test_a_stream_to_a_guest_port_carries_data_both_ways(vhost):
    g, dev, t, _ = vhost
    thread, result = connect_in_thread(dev.guest_cid, 5000)
    (_, _, host_port, _, _, _, op, *_), _ = g.packet()
    assert op == Op.REQUEST
    g.send(Op.RESPONSE, 5000, host_port)
    thread.join(10)
    sock = result["sock"]
    try:
        sock.settimeout(10)
        sock.sendall(b"ping")
        while True:  # the host kernel may send a CREDIT_UPDATE first
            fields, payload = g.packet()
            if fields[6] == Op.RW:
                break
        assert payload == b"ping" and fields[2:4] == (host_port, 5000)
        g.send(Op.RW, 5000, host_port, b"pong")
        assert sock.recv(16) == b"pong"
    finally:
        sock.close()
    g.send(Op.RST, 5000, host_port)


def test_another_device_cannot_take_the_same_cid(vhost):
    g, dev, t, _ = vhost
    with pytest.raises(VsockCidInUseError, match=f"guest CID {dev.guest_cid} is taken by another VM"):
        VhostVsockDevice(dev.guest_cid)


def test_device_reset_stops_the_kernel_device_and_keeps_the_cid(vhost):
    g, dev, t, _ = vhost
    t.write(Register.STATUS, 4, 0)
    assert not dev.running and dev.vhost is not None  # a fresh fd, holding the CID
    with pytest.raises(VsockCidInUseError):
        VhostVsockDevice(dev.guest_cid)
    g.drv.setup(features=VIRTIO_F_VERSION_1, queue_size=64)
    assert dev.running, t.last_error


def test_a_snapshot_is_refused_with_the_reason(vhost):
    g, dev, t, _ = vhost
    with pytest.raises(SnapshotRefused, match="vhost-vsock.*userspace"):
        dev.snapshot_config()


def test_close_releases_every_file_descriptor_and_the_cid():
    before = len(os.listdir("/proc/self/fd"))
    mem = GuestMemory(16 << 20)
    io = IoThread()
    dev = free_cid_device()
    t = MmioTransport(dev, mem)
    dev.start_io(io)
    Driver(t, mem).setup(features=VIRTIO_F_VERSION_1, queue_size=64)
    assert dev.running, t.last_error
    cid = dev.guest_cid
    with t.lock:
        t.reset()
        dev.close()
    io.close()
    mem.close()
    assert len(os.listdir("/proc/self/fd")) == before
    VhostVsockDevice(cid).close()  # the CID is free again
