"""vsock across snapshots: open connections no longer refuse one; the restored device resets the guest's transport.

The test plays the guest driver (tests/virtio_driver.py) with one event
buffer posted, as Linux's virtio_vsock does at probe; the restored device
shares the guest memory (as a restore or a fork maps the same pages).
"""

from __future__ import annotations

import json
import struct

from kvmpy.devices.virtio.iothread import IoThread
from kvmpy.devices.virtio.mmio import MmioTransport
from kvmpy.devices.virtio.vsock import EVENT_SIZE, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, Op, VsockDevice

from test_vsock import GUEST_CID, listen, op_of, vsock  # noqa: F401 (fixture)
from virtio_driver import Driver


def test_snapshot_with_an_open_connection_keeps_it_and_the_restored_device_resets_the_guest(vsock, tmp_path):
    g, dev, t, uds = vsock  # test_vsock's device, driver and guest side, 16 receive buffers posted
    mem, io, drv = g.mem, dev.iothread, g.drv
    event_q = drv.queues[2]
    head, (event_addr,) = event_q.add(in_lens=[EVENT_SIZE])
    clone = clone_t = None
    try:
        server = listen(f"{uds}_5000")
        g.send(Op.REQUEST, 1234, 5000)
        (resp,) = g.packets()
        assert op_of(resp) == Op.RESPONSE
        conn, _ = server.accept()
        state = json.loads(json.dumps(t.snapshot_state()))  # allowed now, with the connection open
        assert state["device"] == {"connections": 1}
        assert not event_q.used_entries()  # the original sends no reset
        # the original's connection goes on
        g.send(Op.RW, 1234, 5000, b"still here")
        assert conn.recv(100) == b"still here"
        clone = VsockDevice(str(tmp_path / "clone.sock"), GUEST_CID)
        clone_t = MmioTransport(clone, mem)
        clone.start_io(io)
        clone_t.restore_state(state)
        used = event_q.used_entries()
        assert used == [(head, EVENT_SIZE)]
        assert struct.unpack("<I", mem.read(event_addr, 4))[0] == VIRTIO_VSOCK_EVENT_TRANSPORT_RESET == 0
        assert clone.transport_resets_sent == 1 and not clone.conns
        # once only: a later event buffer stays unused
        event_q.recycle(head)
        event_q.add(in_lens=[EVENT_SIZE])
        assert not event_q.used_entries()
    finally:
        if clone is not None:
            with clone_t.lock:
                clone.close()


def test_a_restored_device_waits_for_an_event_buffer_before_the_reset(tmp_path):
    from kvmpy.memory import GuestMemory

    mem = GuestMemory(16 << 20)
    io = IoThread()
    dev = VsockDevice(str(tmp_path / "v.sock"), GUEST_CID)
    t = MmioTransport(dev, mem)
    drv = Driver(t, mem)
    drv.setup(queue_size=16)
    clone = VsockDevice(str(tmp_path / "c.sock"), GUEST_CID)
    clone_t = MmioTransport(clone, mem)
    try:
        clone.start_io(io)
        clone_t.restore_state(json.loads(json.dumps(t.snapshot_state())))
        assert clone.transport_resets_sent == 0  # no buffer posted yet
        head, (addr,) = drv.queues[2].add(in_lens=[EVENT_SIZE], notify=False)
        clone_t.notify(2)  # the guest's QueueNotify, which reaches the restored device's transport
        assert drv.queues[2].used_entries() == [(head, EVENT_SIZE)]
        assert clone.transport_resets_sent == 1
    finally:
        clone.close()
        dev.close()
        io.close()
        mem.close()
