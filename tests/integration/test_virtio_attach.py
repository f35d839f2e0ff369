"""attach_virtio against a real VM: a guest's QueueNotify through KVM ioeventfd never exits to userspace.

A tiny long-mode guest writes the entropy device's QueueNotify register
(queue 0) and then reports on port 0x10. The host sets the device up with
the test driver beforehand (the same registers a guest driver would write).
With ioeventfd the write completes inside KVM: the exit loop never sees it
and the I/O thread serves the queue; with the fallback it is an MMIO exit
served on the vCPU thread.
"""

from __future__ import annotations

import os
import select
import time

from kvmpy.devices.virtio.attach import attach_virtio, gsis
from kvmpy.devices.virtio.iothread import IoThread
from kvmpy.devices.virtio.mmio import Register
from kvmpy.devices.virtio.rng import EntropyDevice
from virtio_driver import Allocator, Driver

BASE = 0xD0000  # in the tiny guests' legacy hole: no memory slot, so MMIO
NOTIFY = BASE + Register.QUEUE_NOTIFY

GUEST = f"""
    movl $0, {NOTIFY:#x}     # QueueNotify: queue 0
    out %al, $0x10           # tell the host the notify is done
1:  jmp 1b
"""


def run_notify(guest, *, fast: bool):
    g = guest("64", GUEST, irqchip=True)
    io = IoThread()
    dev = EntropyDevice(source=lambda n: b"\x42" * n)
    attached = attach_virtio(g.vm, g.mem, g.mmio, [dev], iothread=io, base=BASE, ioeventfd=fast, irqfd=fast)
    try:
        t = attached.slots[0].transport
        drv = Driver(t, g.mem, Allocator(0x200000))
        drv.setup()
        head, (buf,) = drv.queues[0].add(in_lens=[16], notify=False)
        loop = g.make_loop()
        g.port.on_write = lambda *a: loop.stop()
        loop.run()
        deadline = time.monotonic() + 5
        used = []
        while not used and time.monotonic() < deadline:
            used = drv.queues[0].used_entries()
            time.sleep(0.01)
        return used, head, g.mem.read(buf, 16), loop.accounting.mmio.get(NOTIFY, 0), t
    finally:
        attached.close()
        io.close()


def test_notify_through_ioeventfd_is_served_without_an_exit(guest):
    used, head, data, notify_exits, t = run_notify(guest, fast=True)
    assert used == [(head, 16)] and data == b"\x42" * 16
    assert notify_exits == 0  # KVM completed the write: no Python ran on the vCPU thread for it
    assert t.interrupts == 1  # and the interrupt went out through the irqfd


def test_notify_without_ioeventfd_is_an_mmio_exit(guest):
    used, head, data, notify_exits, t = run_notify(guest, fast=False)
    assert used == [(head, 16)] and data == b"\x42" * 16
    assert notify_exits == 1


def test_a_claimed_notify_eventfd_reaches_its_claimer_and_not_the_io_thread(guest):
    # What the vhost back end relies on: a claimed ioeventfd is signalled by KVM for the
    # kernel to poll, the I/O thread leaves it alone until it is released.
    g = guest("64", GUEST, irqchip=True)
    io = IoThread()
    attached = attach_virtio(g.vm, g.mem, g.mmio, [EntropyDevice(source=lambda n: b"\x42" * n)], iothread=io,
                             base=BASE)
    try:
        t = attached.slots[0].transport
        drv = Driver(t, g.mem, Allocator(0x200000))
        drv.setup()
        claimed = t.claim_notify_fd(0)
        assert claimed is not None and claimed not in attached.slots[0].notify_fds  # a duplicate
        head, _ = drv.queues[0].add(in_lens=[16], notify=False)
        loop = g.make_loop()
        g.port.on_write = lambda *a: loop.stop()
        loop.run()
        assert select.select([claimed], [], [], 5)[0] == [claimed]  # KVM signalled it
        time.sleep(0.2)
        assert t.notifies == 0 and drv.queues[0].used_entries() == []
        t.release_notify_fd(0)  # polled again: the pending signal is served now
        deadline = time.monotonic() + 5
        used = []
        while not used and time.monotonic() < deadline:
            used = drv.queues[0].used_entries()
            time.sleep(0.01)
        assert used == [(head, 16)]
        os.close(claimed)
    finally:
        attached.close()
        io.close()


def test_without_ioeventfd_there_is_nothing_to_claim(guest):
    g = guest("64", "hlt", irqchip=True)
    io = IoThread()
    attached = attach_virtio(g.vm, g.mem, g.mmio, [EntropyDevice()], iothread=io, base=BASE, ioeventfd=False)
    try:
        assert attached.slots[0].transport.claim_notify_fd(0) is None
    finally:
        attached.close()
        io.close()


def test_switching_paths_and_closing_leaves_no_file_descriptors(guest):
    g = guest("64", "hlt", irqchip=True)
    before = len(os.listdir("/proc/self/fd"))
    io = IoThread()
    attached = attach_virtio(g.vm, g.mem, g.mmio, [EntropyDevice(), EntropyDevice()], iothread=io, base=BASE)
    attached.set_fast_path(ioeventfd=False, irqfd=False)
    assert all(not s.notify_fds for s in attached.slots)
    attached.set_fast_path(ioeventfd=True, irqfd=True)
    assert all(len(s.notify_fds) == 1 for s in attached.slots)
    attached.close()
    io.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_command_line_words_and_gsis(guest):
    g = guest("64", "hlt", irqchip=True)
    io = IoThread()
    with attach_virtio(g.vm, g.mem, g.mmio, [EntropyDevice() for _ in range(5)], iothread=io,
                       base=0xD0000) as attached:
        assert attached.cmdline == [f"virtio_mmio.device=4K@{0xD0000 + i * 0x1000:#x}:{gsi}"
                                    for i, gsi in enumerate([5, 6, 7, 9, 10])]
    io.close()
    assert list(gsis()) == [5, 6, 7, 9, 10, 11, 13, 14, 15]


def test_restored_transport_is_served_through_the_new_vms_ioeventfd(guest):
    """What a snapshot restore does to a device: a fresh VM, a fresh device, the old transport state.

    The rings (guest RAM) are copied to the second VM as memory.bin would be;
    the guest there notifies through the ioeventfd attach_virtio wired, and
    the restored queue goes on from the used index it had.
    """
    import json

    ring_area = (0x200000, 0x10000)
    g1 = guest("64", "hlt", irqchip=True)
    io1 = IoThread()
    with attach_virtio(g1.vm, g1.mem, g1.mmio, [EntropyDevice(source=lambda n: b"\x41" * n)], iothread=io1,
                       base=BASE) as a1:
        t1 = a1.slots[0].transport
        drv = Driver(t1, g1.mem, Allocator(ring_area[0]))
        drv.setup()
        q = drv.queues[0]
        q.add(in_lens=[8])  # served on this thread: the host writes QueueNotify itself
        assert len(q.used_entries()) == 1
        state = json.loads(json.dumps(t1.snapshot_state()))
        rings = g1.mem.read(*ring_area)
    io1.close()

    g2 = guest("64", GUEST, irqchip=True)
    g2.mem.write(ring_area[0], rings)
    io2 = IoThread()
    with attach_virtio(g2.vm, g2.mem, g2.mmio, [EntropyDevice(source=lambda n: b"\x42" * n)], iothread=io2,
                       base=BASE) as a2:
        t2 = a2.slots[0].transport
        t2.restore_state(state)
        q.memory, q.transport = g2.mem, t2
        head, (buf,) = q.add(in_lens=[16], notify=False)
        loop = g2.make_loop()
        g2.port.on_write = lambda *a: loop.stop()
        loop.run()
        deadline = time.monotonic() + 5
        used = []
        while not used and time.monotonic() < deadline:
            used = q.used_entries()
            time.sleep(0.01)
        assert used == [(head, 16)] and g2.mem.read(buf, 16) == b"\x42" * 16
        assert g2.mem.read_u16(q.used + 2) == 2  # the used index went on from the snapshot's
        assert loop.accounting.mmio.get(NOTIFY, 0) == 0  # through the new VM's ioeventfd
    io2.close()
