"""Snapshot state of virtio devices: transport and queue round trips, device configs, refusals.

A "restore" here is what kvmpy/snapshot.py does: a fresh device and
transport over a copy of guest RAM, loaded from the JSON of the old
transport's `snapshot_state()`. No /dev/kvm needed.
"""

from __future__ import annotations

import json
import socket

import pytest

from kvmpy.devices.virtio.attach import device_from_snapshot, devices_from_snapshot
from kvmpy.devices.virtio.blk import BlockDevice
from kvmpy.devices.virtio.mmio import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceStatus,
    MmioTransport,
    Register,
    SnapshotRefused,
)
from kvmpy.devices.virtio.net import NetDevice
from kvmpy.devices.virtio.queue import Virtqueue
from kvmpy.devices.virtio.rng import EntropyDevice
from kvmpy.devices.virtio.vsock import VsockDevice
from kvmpy.memory import GuestMemory

from virtio_driver import Driver

SIZE = 1 << 20
FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC


@pytest.fixture
def mem():
    with GuestMemory(SIZE) as m:
        yield m


def copy_of(mem: GuestMemory) -> GuestMemory:
    new = GuestMemory(SIZE)
    new.write(0, mem.read(0, SIZE))
    return new


def through_json(state: dict) -> dict:
    return json.loads(json.dumps(state))


def test_queue_state_round_trips(mem):
    q = Virtqueue(mem, 256, 1)
    q.size, q.desc_table, q.avail_ring, q.used_ring = 64, 0x1000, 0x2000, 0x3000
    q.ready, q.event_idx, q.indirect = True, True, True
    q.last_avail_idx, q.next_used_idx = 0xFFFE, 0xFFFD
    q.max_chain_bytes = 12345
    q.restore_state({**q.snapshot_state(), "signalled_used": 0xFFFC})  # as a device that interrupted at 0xFFFC
    state = through_json(q.snapshot_state())
    r = Virtqueue(mem, 256, 1)
    r.restore_state(state)
    assert r.snapshot_state() == q.snapshot_state()
    assert (r.last_avail_idx, r.next_used_idx, r.signalled_used) == (0xFFFE, 0xFFFD, 0xFFFC)


def test_restoring_a_ready_queue_checks_its_rings(mem):
    q = Virtqueue(mem, 256)
    state = q.snapshot_state() | {"ready": True, "size": 16, "used_ring": SIZE + 0x1000}
    with pytest.raises(Exception, match="used ring .* is not guest RAM"):
        Virtqueue(mem, 256).restore_state(state)


def test_transport_round_trip_continues_the_rings(mem):
    served = []
    t = MmioTransport(EntropyDevice(), mem, lambda: served.append(1))
    drv = Driver(t, mem)
    drv.setup(features=FEATURES)
    q = drv.queues[0]
    for _ in range(3):
        q.add(in_lens=[32])
    assert [n for _, n in q.used_entries()] == [32, 32, 32]
    t.write(Register.INTERRUPT_ACK, 4, 1)
    t.write(Register.QUEUE_SEL, 4, 0)
    state = through_json(t.snapshot_state())
    assert state["status"] & DeviceStatus.DRIVER_OK and state["driver_features"] == FEATURES
    assert state["queues"][0]["last_avail_idx"] == 3 and state["queues"][0]["next_used_idx"] == 3

    mem2 = copy_of(mem)
    try:
        raised = []
        t2 = MmioTransport(EntropyDevice(), mem2, lambda: raised.append(1))
        t2.restore_state(state)
        assert t2.snapshot_state() == t.snapshot_state()
        assert t2.queues[0].event_idx and t2.queues[0].indirect
        # The guest driver, unaware of the restore, keeps using its rings.
        q.memory, q.transport = mem2, t2
        mem2.write_u16(q.avail + 4 + 2 * q.size, 3)  # used_event: interrupt once entry 3 is used
        head, _ = q.add(in_lens=[16], indirect=True)
        assert q.used_entries() == [(head, 16)]
        assert mem2.read_u16(q.used + 2) == 4
        assert raised
    finally:
        mem2.close()


def test_buffers_posted_before_the_snapshot_are_served_after_restore(mem):
    t = MmioTransport(EntropyDevice(), mem)
    drv = Driver(t, mem)
    drv.setup(features=FEATURES)
    q = drv.queues[0]
    head, _ = q.add(in_lens=[8], notify=False)  # posted, the notify not yet seen by the device
    state = through_json(t.snapshot_state())
    t2 = MmioTransport(EntropyDevice(), mem)
    t2.restore_state(state)
    assert q.used_entries() == [(head, 8)]


def test_a_state_of_another_device_is_refused(mem, tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4096))
    t = MmioTransport(EntropyDevice(), mem)
    Driver(t, mem).setup(features=FEATURES)
    blk = BlockDevice(img)
    try:
        with pytest.raises(SnapshotRefused, match="device id 4 with 1 queues, this is 2"):
            MmioTransport(blk, mem).restore_state(through_json(t.snapshot_state()))
    finally:
        blk.close()


def test_device_configs_recreate_equal_devices(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(8192))
    originals = [BlockDevice(img, read_only=True), EntropyDevice(), VsockDevice(tmp_path / "v.sock", 7)]
    configs = through_json([d.snapshot_config() for d in originals])
    assert [c["kind"] for c in configs] == ["blk", "rng", "vsock"]
    made = devices_from_snapshot(configs)
    try:
        blk, rng, vsock = made
        assert (blk.path, blk.read_only, blk.capacity) == (img, True, 16)
        assert isinstance(rng, EntropyDevice)
        assert (vsock.uds_path, vsock.guest_cid) == (str(tmp_path / "v.sock"), 7)
        assert [d.snapshot_config() for d in made] == configs
    finally:
        for d in made + originals:
            d.close()


def test_vsock_socket_taken_by_another_vm_gets_a_new_path(tmp_path):
    taken = tmp_path / "v.sock"
    taken.write_bytes(b"")
    dev = device_from_snapshot({"kind": "vsock", "cid": 3, "uds_path": str(taken)})
    assert dev.uds_path.startswith(str(taken) + ".") and dev.guest_cid == 3


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown kind 'floppy'"):
        device_from_snapshot({"kind": "floppy"})


def test_net_on_a_bare_fd_cannot_be_recreated():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        with pytest.raises(SnapshotRefused, match="not a kvmpy Tap"):
            NetDevice(a.fileno(), "52:54:00:12:34:56").snapshot_config()
