"""Device buses: dispatch by range, relative offsets, conflicts, open-bus reads."""

from __future__ import annotations

import pytest

from kvmpy.bus import Bus, mmio_bus, pio_bus
from kvmpy.errors import BusError


class Recorder:
    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def test_read_goes_to_the_device_whose_range_holds_the_address():
    bus = pio_bus()
    a, b = Recorder(0xAA), Recorder(0xBB)
    bus.register(0x3F8, 8, a)
    bus.register(0x60, 5, b)
    assert bus.read(0x3FD, 1) == 0xAA
    assert bus.read(0x64, 1) == 0xBB
    assert (a.reads, b.reads) == ([(5, 1)], [(4, 1)])


def test_write_offset_is_relative_to_the_registered_base():
    bus = mmio_bus()
    dev = Recorder()
    bus.register(0xD000_0000, 0x1000, dev)
    bus.write(0xD000_0FFC, 4, 0x1234)
    assert dev.writes == [(0xFFC, 4, 0x1234)]


def test_overlapping_registration_names_both_devices():
    bus = pio_bus()
    bus.register(0x3F8, 8, Recorder(), "com1")
    with pytest.raises(BusError, match=r"uart2 at \[0x3fc, 0x404\) overlaps com1 at \[0x3f8, 0x400\)"):
        bus.register(0x3FC, 8, Recorder(), "uart2")


def test_registration_inside_an_existing_range_is_refused():
    bus = mmio_bus()
    bus.register(0x1000, 0x1000, Recorder(), "big")
    with pytest.raises(BusError, match="overlaps big"):
        bus.register(0x1800, 0x10, Recorder(), "small")


def test_adjacent_ranges_are_allowed_and_dispatch_separately():
    bus = pio_bus()
    low, high = Recorder(1), Recorder(2)
    bus.register(0x40, 4, low)
    bus.register(0x44, 4, high)
    assert [bus.read(p, 1) for p in (0x43, 0x44)] == [1, 2]


def test_unclaimed_read_is_all_ones_for_its_size_and_counted():
    bus = pio_bus()
    assert [bus.read(0x80, n) for n in (1, 2, 4)] == [0xFF, 0xFFFF, 0xFFFF_FFFF]
    assert bus.unclaimed == 3


def test_unclaimed_write_is_dropped_and_counted():
    bus = pio_bus()
    dev = Recorder()
    bus.register(0x10, 1, dev)
    bus.write(0x11, 1, 5)
    assert dev.writes == [] and bus.unclaimed == 1


def test_unregister_removes_every_range_of_the_device():
    bus = pio_bus()
    dev, other = Recorder(7), Recorder(9)
    bus.register(0x10, 2, dev)
    bus.register(0x20, 2, dev)
    bus.register(0x30, 2, other)
    bus.unregister(dev)
    assert [bus.read(p, 1) for p in (0x10, 0x20, 0x30)] == [0xFF, 0xFF, 9]
    assert len(bus) == 1


def test_unregistered_range_can_be_claimed_again():
    bus = pio_bus()
    dev = Recorder()
    bus.register(0x10, 2, dev)
    bus.unregister(dev)
    bus.register(0x10, 2, Recorder(), "again")
    assert [r.name for r in bus.ranges] == ["again"]


def test_range_beyond_the_pio_space_is_refused():
    with pytest.raises(BusError, match="beyond 0x10000"):
        pio_bus().register(0xFFFF, 2, Recorder())


def test_empty_range_is_refused():
    with pytest.raises(BusError, match="empty"):
        Bus("test").register(0x10, 0, Recorder())
