"""Device buses: address ranges -> device objects, for port I/O and MMIO.

A device is any object with

    read(offset: int, size: int) -> int
    write(offset: int, size: int, value: int) -> None

where `offset` is relative to the base it was registered at. Devices never
see KVM; the exit loop asks the bus. Overlapping registrations are refused.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol

from .errors import BusError


class Device(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class ByteRegisters:
    """Base of devices made of 8-bit registers (the 16550A, the i8042, ...).

    A wider access is split into byte accesses of consecutive registers,
    little-endian, as the ISA bus splits it; subclasses implement
    `_read_byte(offset)` and `_write_byte(offset, value)`.
    """

    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            value |= self._read_byte(offset + i) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)

    def _read_byte(self, offset: int) -> int:
        raise NotImplementedError(f"{type(self).__name__} must implement _read_byte")

    def _write_byte(self, offset: int, value: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _write_byte")


@dataclass(frozen=True)
class Range:
    base: int
    length: int
    device: Device
    name: str

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """A set of non-overlapping address ranges, each served by one device.

    Accesses nothing claims read as all ones (an open bus) and writes are
    dropped; both are counted in `unclaimed`.
    """

    def __init__(self, name: str, limit: int = 1 << 64) -> None:
        self.name = name
        self.limit = limit
        self._ranges: list[Range] = []
        self._bases: list[int] = []
        self.unclaimed = 0

    def register(self, base: int, length: int, device: Device, name: str | None = None) -> Range:
        """Claim [base, base+length) for `device`; `BusError` if any part is taken."""
        label = name or type(device).__name__
        if length <= 0 or base < 0 or base + length > self.limit:
            raise BusError(f"{self.name} bus: {label} range {base:#x}+{length:#x} is empty or "
                           f"beyond {self.limit:#x}")
        i = bisect.bisect(self._bases, base)
        for neighbour in self._ranges[max(i - 1, 0):i + 1]:
            if base < neighbour.end and neighbour.base < base + length:
                raise BusError(
                    f"{self.name} bus: {label} at [{base:#x}, {base + length:#x}) overlaps "
                    f"{neighbour.name} at [{neighbour.base:#x}, {neighbour.end:#x})")
        r = Range(base, length, device, label)
        self._ranges.insert(i, r)
        self._bases.insert(i, base)
        return r

    def unregister(self, device: Device) -> None:
        """Remove every range served by `device`."""
        keep = [r for r in self._ranges if r.device is not device]
        self._ranges = keep
        self._bases = [r.base for r in keep]

    def find(self, addr: int) -> Range | None:
        i = bisect.bisect(self._bases, addr) - 1
        if i >= 0:
            r = self._ranges[i]
            if addr < r.base + r.length:
                return r
        return None

    def read(self, addr: int, size: int) -> int:
        i = bisect.bisect(self._bases, addr) - 1
        if i >= 0:
            r = self._ranges[i]
            if addr < r.base + r.length:
                return r.device.read(addr - r.base, size)
        self.unclaimed += 1
        return (1 << (8 * size)) - 1

    def write(self, addr: int, size: int, value: int) -> None:
        i = bisect.bisect(self._bases, addr) - 1
        if i >= 0:
            r = self._ranges[i]
            if addr < r.base + r.length:
                r.device.write(addr - r.base, size, value)
                return
        self.unclaimed += 1

    @property
    def ranges(self) -> list[Range]:
        return list(self._ranges)

    def __len__(self) -> int:
        return len(self._ranges)

    def __repr__(self) -> str:
        inner = ", ".join(f"{r.name}@{r.base:#x}+{r.length:#x}" for r in self._ranges)
        return f"Bus({self.name}: {inner})"


def pio_bus() -> Bus:
    """A 64 KiB x86 I/O port space."""
    return Bus("pio", 1 << 16)


def mmio_bus() -> Bus:
    return Bus("mmio")
