"""virtio-mmio v2 register semantics (virtio 1.2 section 4.2), feature negotiation, status and reset."""

from __future__ import annotations

import pytest

from kvmpy.devices.virtio.mmio import (MAGIC_VALUE, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1,
                                       DeviceStatus, MmioTransport, Register, VirtioDevice)
from kvmpy.devices.virtio.rng import EntropyDevice
from kvmpy.memory import GuestMemory
from virtio_driver import Driver

S = DeviceStatus


class TwoQueueDevice(VirtioDevice):
    device_id = 42
    queue_sizes = (64, 16)
    features = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | (1 << 3)

    def __init__(self) -> None:
        super().__init__()
        self.activated = self.resets = 0
        self.notified: list[int] = []
        self.config = bytearray(b"\x01\x02\x03\x04\x05\x06\x07\x08")

    def config_space(self) -> bytes:
        return bytes(self.config)

    def write_config(self, offset: int, data: bytes) -> None:
        self.config[offset:offset + len(data)] = data

    def activate(self) -> None:
        self.activated += 1

    def process_queue(self, index: int) -> None:
        self.notified.append(index)

    def reset(self) -> None:
        self.resets += 1


@pytest.fixture
def mem():
    with GuestMemory(1 << 20) as m:
        yield m


@pytest.fixture
def dev(mem):
    d = TwoQueueDevice()
    interrupts = []
    t = MmioTransport(d, mem, lambda: interrupts.append(1))
    t.raised = interrupts
    return d, t


def r(t: MmioTransport, off: int) -> int:
    return t.read(off, 4)


def w(t: MmioTransport, off: int, value: int) -> None:
    t.write(off, 4, value)


def test_identification_registers(dev):
    _, t = dev
    assert r(t, Register.MAGIC_VALUE) == MAGIC_VALUE == 0x74726976
    assert r(t, Register.VERSION) == 2
    assert r(t, Register.DEVICE_ID) == 42
    assert r(t, Register.VENDOR_ID) != 0


def test_device_features_are_read_through_the_select_register(dev):
    _, t = dev
    w(t, Register.DEVICE_FEATURES_SEL, 0)
    assert r(t, Register.DEVICE_FEATURES) == VIRTIO_F_INDIRECT_DESC | (1 << 3)
    w(t, Register.DEVICE_FEATURES_SEL, 1)
    assert r(t, Register.DEVICE_FEATURES) == 1  # VERSION_1 is bit 32
    w(t, Register.DEVICE_FEATURES_SEL, 2)
    assert r(t, Register.DEVICE_FEATURES) == 0


def test_queue_num_max_per_queue_and_zero_past_the_last(dev):
    _, t = dev
    for sel, expect in ((0, 64), (1, 16), (2, 0), (100, 0)):
        w(t, Register.QUEUE_SEL, sel)
        assert r(t, Register.QUEUE_NUM_MAX) == expect


def test_full_initialisation_activates_the_device(dev, mem):
    d, t = dev
    feats = Driver(t, mem).setup()
    assert feats & VIRTIO_F_VERSION_1
    assert r(t, Register.STATUS) == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK
    assert d.activated == 1 and t.active
    assert t.queues[0].indirect and not t.queues[0].event_idx


def test_features_without_version_1_are_refused(dev, mem):
    _, t = dev
    with pytest.raises(RuntimeError, match="refused"):
        Driver(t, mem).setup(features=VIRTIO_F_INDIRECT_DESC)
    assert not r(t, Register.STATUS) & S.FEATURES_OK


def test_features_the_device_does_not_offer_are_refused(dev, mem):
    _, t = dev
    with pytest.raises(RuntimeError, match="refused"):
        Driver(t, mem).setup(features=VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX)


def test_driver_features_are_frozen_after_features_ok(dev, mem):
    _, t = dev
    drv = Driver(t, mem)
    drv.setup(features=VIRTIO_F_VERSION_1)
    drv.write_features(VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC)
    assert t.driver_features == VIRTIO_F_VERSION_1


def test_queue_addresses_read_back_and_freeze_when_ready(dev, mem):
    _, t = dev
    w(t, Register.QUEUE_SEL, 1)
    w(t, Register.QUEUE_NUM, 8)
    w(t, Register.QUEUE_DESC_LOW, 0x1000)
    w(t, Register.QUEUE_DESC_HIGH, 0)
    w(t, Register.QUEUE_DRIVER_LOW, 0x2000)
    w(t, Register.QUEUE_DEVICE_LOW, 0x3000)
    assert (r(t, Register.QUEUE_DESC_LOW), r(t, Register.QUEUE_DRIVER_LOW), r(t, Register.QUEUE_DEVICE_LOW)) == \
        (0x1000, 0x2000, 0x3000)
    w(t, Register.QUEUE_READY, 1)
    assert r(t, Register.QUEUE_READY) == 1
    w(t, Register.QUEUE_DESC_LOW, 0x5000)  # ignored while ready
    assert r(t, Register.QUEUE_DESC_LOW) == 0x1000
    w(t, Register.QUEUE_READY, 0)
    assert r(t, Register.QUEUE_READY) == 0


def test_high_halves_of_queue_addresses(dev):
    _, t = dev
    w(t, Register.QUEUE_SEL, 0)
    w(t, Register.QUEUE_DESC_HIGH, 0x1)
    w(t, Register.QUEUE_DESC_LOW, 0x2000)
    assert t.queues[0].desc_table == 0x1_0000_2000
    assert r(t, Register.QUEUE_DESC_HIGH) == 1


def test_queue_ready_with_rings_outside_ram_needs_reset(dev, mem):
    _, t = dev
    drv = Driver(t, mem)
    drv.setup(driver_ok=False)
    t.queues[0].ready = False
    w(t, Register.QUEUE_SEL, 0)
    w(t, Register.QUEUE_DESC_LOW, 0xFFFF_F000)
    w(t, Register.QUEUE_READY, 1)
    assert r(t, Register.STATUS) & S.DEVICE_NEEDS_RESET
    assert r(t, Register.QUEUE_READY) == 0


def test_queue_notify_reaches_the_device_only_when_active(dev, mem):
    d, t = dev
    w(t, Register.QUEUE_NOTIFY, 0)
    assert d.notified == []
    Driver(t, mem).setup()
    w(t, Register.QUEUE_NOTIFY, 1)
    w(t, Register.QUEUE_NOTIFY, 7)  # no such queue
    assert d.notified == [1]


def test_interrupt_status_and_ack(dev, mem):
    d, t = dev
    Driver(t, mem).setup()
    t.queues[0].add_used(0, 0)
    t.signal_used(t.queues[0])
    assert r(t, Register.INTERRUPT_STATUS) == 1 and t.raised == [1]
    t.signal_config()
    assert r(t, Register.INTERRUPT_STATUS) == 3
    w(t, Register.INTERRUPT_ACK, 1)
    assert r(t, Register.INTERRUPT_STATUS) == 2
    w(t, Register.INTERRUPT_ACK, 2)
    assert r(t, Register.INTERRUPT_STATUS) == 0


def test_a_back_ends_used_buffer_interrupt_sets_the_status_bit_linux_checks(dev, mem):
    # vhost decided the driver wants it; vm_interrupt only walks the vrings with bit 0 set.
    d, t = dev
    t.raise_used_buffer()
    assert r(t, Register.INTERRUPT_STATUS) == 0 and t.raised == []  # not before DRIVER_OK
    Driver(t, mem).setup()
    t.raise_used_buffer()
    assert r(t, Register.INTERRUPT_STATUS) == 1 and t.raised == [1]


def test_without_attach_virtio_there_is_no_notify_eventfd_to_claim(dev):
    d, t = dev
    assert t.claim_notify_fd(0) is None
    t.release_notify_fd(0)  # and nothing to give back


def test_config_space_reads_any_width_and_changes_bump_the_generation(dev):
    d, t = dev
    assert t.read(Register.CONFIG, 1) == 0x01
    assert t.read(Register.CONFIG + 2, 2) == 0x0403
    assert t.read(Register.CONFIG + 4, 4) == 0x08070605
    assert t.read(Register.CONFIG + 6, 8) == 0x0807  # past the end reads zero
    t.write(Register.CONFIG + 1, 1, 0xAA)
    assert d.config[1] == 0xAA
    gen = r(t, Register.CONFIG_GENERATION)
    t.signal_config()
    assert r(t, Register.CONFIG_GENERATION) == gen + 1


def test_narrow_register_accesses_are_ignored(dev):
    _, t = dev
    assert t.read(Register.MAGIC_VALUE, 2) == 0
    t.write(Register.STATUS, 1, 0xFF)
    assert r(t, Register.STATUS) == 0


def test_writing_zero_to_status_resets_everything(dev, mem):
    d, t = dev
    Driver(t, mem).setup()
    t.signal_config()
    resets = d.resets
    w(t, Register.STATUS, 0)
    assert r(t, Register.STATUS) == 0 and r(t, Register.INTERRUPT_STATUS) == 0
    assert d.resets == resets + 1 and t.driver_features == 0
    w(t, Register.QUEUE_SEL, 0)
    assert r(t, Register.QUEUE_READY) == 0 and r(t, Register.QUEUE_DESC_LOW) == 0
    Driver(t, mem).setup()  # and the device comes up again
    assert d.activated == 2


def test_driver_ok_without_features_ok_needs_reset(dev):
    d, t = dev
    w(t, Register.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK)
    assert r(t, Register.STATUS) & S.DEVICE_NEEDS_RESET and d.activated == 0


def test_needs_reset_stops_queue_work_and_raises_a_config_interrupt(dev, mem):
    d, t = dev
    Driver(t, mem).setup()
    t.set_needs_reset("test")
    assert r(t, Register.STATUS) & S.DEVICE_NEEDS_RESET
    assert r(t, Register.INTERRUPT_STATUS) & 2
    w(t, Register.QUEUE_NOTIFY, 0)
    assert d.notified == []
    w(t, Register.STATUS, 0)
    assert not r(t, Register.STATUS) & S.DEVICE_NEEDS_RESET


def test_device_exception_becomes_needs_reset_not_a_crash(mem):
    class Broken(TwoQueueDevice):
        def process_queue(self, index: int) -> None:
            raise RuntimeError("bug")

    t = MmioTransport(Broken(), mem)
    Driver(t, mem).setup()
    w(t, Register.QUEUE_NOTIFY, 0)  # must not raise
    assert t.needs_reset and "bug" in t.last_error


def test_shared_memory_registers_say_none(dev):
    _, t = dev
    assert r(t, Register.SHM_LEN_LOW) == 0xFFFF_FFFF and r(t, Register.SHM_LEN_HIGH) == 0xFFFF_FFFF


def test_entropy_device_fills_buffers_through_the_transport(mem):
    t = MmioTransport(EntropyDevice(source=lambda n: b"\x5A" * n), mem)
    drv = Driver(t, mem)
    drv.setup()
    head, (buf,) = drv.queues[0].add(in_lens=[32])
    assert drv.queues[0].used_entries() == [(head, 32)]
    assert mem.read(buf, 32) == b"\x5A" * 32
