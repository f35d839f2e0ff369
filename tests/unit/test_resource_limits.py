"""Per-VM resource limits (docs/reliability.md, "Resource limits"): reaching one degrades the guest's
service (a dropped packet, a refused connection, back-pressure), never the VMM.

Each test drives the device as a hostile guest (or host peer) would, past the
limit, and checks both sides: the VMM holds no more than the limit, and the
device still serves the guest afterwards.
"""

from __future__ import annotations

import errno
import socket
import struct
import time

from kvmpy.devices.console_log import CONSOLE_LOG_MAX, ConsoleLog
from kvmpy.devices.serial import RX_BACKLOG_SIZE, Serial16550
from kvmpy.devices.virtio import blk as blk_mod
from kvmpy.devices.virtio import vsock as vsock_mod
from kvmpy.devices.virtio.mmio import MmioTransport
from kvmpy.devices.virtio.vsock import (
    HDR,
    HOST_CID,
    MAX_CONNECTIONS,
    MAX_CONTROL_PACKETS,
    MAX_PAYLOAD,
    MAX_PENDING_CLIENTS,
    Op,
)
from kvmpy.memory import GuestMemory

from test_virtio_net import FRAME, mem, net, wait_used  # noqa: F401 (fixtures)
from test_virtio_net import HDR as NET_HDR
from test_vsock import GUEST_CID, op_of, vsock  # noqa: F401 (fixture)
from virtio_driver import Driver


def _drain_tx(g) -> None:
    for h, _ in g.tx.used_entries():
        g.tx.recycle(h)


def test_vsock_control_queue_stops_at_its_limit_when_the_guest_takes_no_packets(vsock):
    g, dev, t, _ = vsock
    # The guest's 16 posted receive buffers take the first 16 answers; it posts no more.
    extra = 10
    for port in range(16 + MAX_CONTROL_PACKETS + extra):
        g.send(Op.REQUEST, 40000 + port % 20000, 5999)  # nobody listens: each is answered RST
    assert len(dev.control) == MAX_CONTROL_PACKETS
    assert dev.control_dropped == extra
    assert not t.needs_reset
    # Once the guest reads again, it gets the queued answers: service degraded, not broken.
    got = g.packets(20)
    assert len(got) >= 20 and all(op_of(p) == Op.RST for p in got)


def test_vsock_connections_stop_at_their_limit_and_the_rest_are_reset(vsock):
    g, dev, t, uds = vsock
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{uds}_5000")
    server.listen(MAX_CONNECTIONS + 16)
    try:
        answers = []
        for port in range(MAX_CONNECTIONS + 3):
            g.send(Op.REQUEST, 1000 + port, 5000)
            answers += g.packets(1)
        ops = [op_of(p) for p in answers]
        assert ops.count(Op.RESPONSE) == MAX_CONNECTIONS and ops[-3:] == [Op.RST] * 3
        assert len(dev.conns) == MAX_CONNECTIONS and dev.refused == 3
        # Closing one makes room again.
        g.send(Op.RST, 1000, 5000)
        g.send(Op.REQUEST, 60000, 5000)
        (p,) = g.packets(1)
        assert op_of(p) == Op.RESPONSE and not t.needs_reset
    finally:
        server.close()


def test_vsock_socket_failure_answers_the_guest_with_rst(vsock, monkeypatch):
    g, dev, t, uds = vsock
    real = socket.socket

    def no_sockets(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(vsock_mod.socket, "socket", no_sockets)
    try:
        g.send(Op.REQUEST, 1234, 5000)
    finally:
        monkeypatch.setattr(vsock_mod.socket, "socket", real)
    (p,) = g.packets(1)
    assert op_of(p) == Op.RST and p[0][2:4] == (5000, 1234)
    assert dev.refused == 1 and not t.needs_reset


def test_vsock_half_open_host_clients_stop_at_their_limit(vsock):
    g, dev, t, uds = vsock
    clients = []
    try:
        for _ in range(MAX_PENDING_CLIENTS + 4):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(uds)  # and never sends its CONNECT line
            c.settimeout(5)
            clients.append(c)
        deadline = time.monotonic() + 5
        while dev.refused < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dev.pending_clients == MAX_PENDING_CLIENTS and dev.refused == 4
        assert clients[-1].recv(10) == b""  # the VMM closed the one over the limit
    finally:
        for c in clients:
            c.close()


def test_vsock_packet_larger_than_the_limit_is_dropped_unread(vsock):
    g, dev, t, _ = vsock
    hdr = HDR.pack(GUEST_CID, HOST_CID, 1234, 5999, MAX_PAYLOAD + 1, 1, Op.RW, 0, 65536, 0)
    head, _ = g.tx.add([hdr + bytes(MAX_PAYLOAD + 1)])
    assert (head, 0) in g.tx.used_entries()
    assert dev.bad_chains == 1 and dev.packets_in == 0 and not t.needs_reset
    g.send(Op.RW, 1234, 5999, bytes(MAX_PAYLOAD))  # at the limit: read, and answered (no such connection)
    (p,) = g.packets(1)
    assert op_of(p) == Op.RST


def test_net_rx_holds_no_frames_in_the_vmm_the_tap_queue_pushes_back(net):
    dev, t, drv, host = net
    host.setblocking(False)
    sent = 0
    try:
        while sent < 100_000:
            host.send(NET_HDR + FRAME + struct.pack("<I", sent))
            sent += 1
    except BlockingIOError:
        pass  # the guest posts no buffers: the sender is pushed back
    assert 0 < sent < 100_000
    time.sleep(0.05)
    assert not dev.rx_polling and dev.rx_packets == 0
    rx = drv.queues[0]
    got = []
    while len(got) < sent:
        for _ in range(min(rx.size, sent - len(got))):
            rx.add(in_lens=[2048], notify=False)
        rx.kick()
        for head, length in wait_used(rx, min(rx.size, sent - len(got))):
            got.append(length)
            rx.recycle(head)
    assert len(got) == sent == dev.rx_packets  # every frame the TAP took reached the guest, none was lost


def test_blk_request_larger_than_the_chain_limit_is_failed_without_io(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * 512))
    with GuestMemory(300 << 20) as big:  # lazily mapped: nothing is touched but the rings and the header
        dev = blk_mod.BlockDevice(image)
        t = MmioTransport(dev, big)
        drv = Driver(t, big)
        drv.setup()
        q = drv.queues[0]
        limit = blk_mod.SEG_MAX * blk_mod.SIZE_MAX + 2 * blk_mod.SECTOR_SIZE
        # Built by hand: the driver helper would fill the huge buffer.
        hdr_addr = 0x100_0000
        big.write(hdr_addr, struct.pack("<IIQ", blk_mod.RequestType.IN, 0, 0))
        slots = q.free[:3]
        q.write_desc(q.desc, slots[0], hdr_addr, 16, 1, slots[1])
        q.write_desc(q.desc, slots[1], 0x200_0000, limit, 1 | 2, slots[2])
        q.write_desc(q.desc, slots[2], 0x100_1000, 1, 2, 0)
        big.write_u8(0x100_1000, 0xEE)
        q.publish(slots[0])
        q.kick()
        assert q.used_entries() == [(slots[0], 0)]  # returned unused
        assert big.read_u8(0x100_1000) == 0xEE and dev.bad_chains == 1 and dev.bytes_read == 0
        assert not t.needs_reset
        dev.close()


def test_console_log_keeps_the_last_bytes_up_to_its_limit():
    log = ConsoleLog()
    chunk = b"x" * 65536
    total = 0
    while total <= CONSOLE_LOG_MAX + (1 << 20):
        log.append(chunk)
        total += len(chunk)
        assert len(log.data) <= CONSOLE_LOG_MAX
    log.append(b"login: ")
    assert log.end == total + 7 and log.base > 0 and log.dropped == log.base
    assert log.wait_for(b"login: ", 0, start=total - 10) == total + 7  # absolute offsets still work
    assert log.since(0).endswith(b"login: ") and len(log.since(0)) == len(log.data)
    assert log.since(total) == b"login: "


def test_serial_input_backlog_takes_no_more_than_its_limit():
    uart = Serial16550(lambda b: None)
    taken = uart.receive(bytes(RX_BACKLOG_SIZE * 4))
    assert RX_BACKLOG_SIZE <= taken < RX_BACKLOG_SIZE + 64  # the FIFO's 16 bytes and the backlog; the rest refused
    assert uart.receive(b"more") == 0
