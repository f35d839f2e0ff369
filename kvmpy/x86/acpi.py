"""Minimal ACPI tables (RSDP, RSDT, FADT, FACS, DSDT) and the ACPI PM timer.

Enough for a guest that looks up the FADT for its PM-timer port, as
kvm-unit-tests' `vmexit_inl_pmtimer` does (lib/acpi.c: it scans 0xE0000 -
0xFFFFF in 16-byte steps for "RSD PTR ", follows the RSDT and matches table
signatures). Layouts: ACPI 1.0b sections 5.2.4 (RSDP), 5.2.7 (RSDT), 5.2.8
(FADT, 116 bytes), 5.2.9 (FACS); the ports are those SeaBIOS gives QEMU's
PIIX4 PM device (PM1a event 0x600, control 0x604, timer 0x608).

`PmTimer` is the 24-bit, 3.579545 MHz free-running counter (ACPI 4.7.2.1)
computed from the host's monotonic clock; `Pm1Registers` keeps PM1a
status/enable/control values and reports an S3 request; `CmosRtc` is the
little of the CMOS RTC that a wake-up alarm needs.
"""

from __future__ import annotations

import struct
import time
from typing import Callable

from ..memory import GuestMemory

RSDP_ADDR = 0xE0000
RSDT_ADDR = RSDP_ADDR + 0x40
FADT_ADDR = RSDP_ADDR + 0x80
FACS_ADDR = RSDP_ADDR + 0x100  # 64-byte aligned, as ACPI requires
DSDT_ADDR = RSDP_ADDR + 0x140

PM1A_EVT_BLK = 0x600
PM1A_CNT_BLK = 0x604
PM_TMR_BLK = 0x608
PM_TIMER_HZ = 3_579_545
SCI_IRQ = 9

OEM_ID = b"KVMPY "
OEM_TABLE_ID = b"KVMPYVM "


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A table with the 36-byte system description header and a correct checksum."""
    length = 36 + len(body)
    header = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1,
                         b"KVMP", 1)
    raw = bytearray(header + body)
    raw[9] = _checksum(bytes(raw))
    return bytes(raw)


def build_tables() -> dict[int, bytes]:
    """{guest-physical address: bytes} of the RSDP, RSDT, FADT, FACS and an empty DSDT."""
    rsdp = bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 0, RSDT_ADDR))
    rsdp[8] = _checksum(bytes(rsdp))
    rsdt = _table(b"RSDT", 1, struct.pack("<I", FADT_ADDR))
    fadt_body = struct.pack(
        "<IIBBHIBBBBIIIIIIIIBBBBBBBBHHHHBBBBBHBI",
        FACS_ADDR, DSDT_ADDR,
        0, 0, SCI_IRQ, 0,  # int model, reserved, SCI, SMI_CMD 0: ACPI always enabled
        0, 0, 0, 0,  # acpi_enable/disable, s4bios, pstate
        PM1A_EVT_BLK, 0, PM1A_CNT_BLK, 0, 0, PM_TMR_BLK, 0, 0,
        4, 2, 0, 4, 0, 0, 0, 0,  # pm1 evt len, pm1 cnt len, pm2, timer len, gpe...
        0xFFF, 0xFFF, 0, 0,  # C2/C3 latencies: not supported
        0, 0, 0, 0, 0, 0, 0,  # duty, alarms, century, iapc_boot_arch, reserved
        (1 << 0) | (1 << 2))  # flags: WBINVD works, C1 supported; TMR_VAL_EXT clear: 24-bit timer
    fadt = _table(b"FACP", 1, fadt_body)
    assert len(fadt) == 116, len(fadt)
    facs = struct.pack("<4sIIIII40s", b"FACS", 64, 0, 0, 0, 0, b"")
    assert len(facs) == 64
    dsdt = _table(b"DSDT", 1, b"")
    return {RSDP_ADDR: bytes(rsdp), RSDT_ADDR: rsdt, FADT_ADDR: fadt, FACS_ADDR: facs, DSDT_ADDR: dsdt}


def write_acpi_tables(mem: GuestMemory) -> int:
    """Write the tables into guest RAM (below 1 MiB); returns the RSDP address."""
    for addr, data in build_tables().items():
        mem.write(addr, data)
    return RSDP_ADDR


class PmTimer:
    """The ACPI PM timer: a 24-bit counter at 3.579545 MHz (reads of any width)."""

    def __init__(self) -> None:
        self._start = time.monotonic_ns()

    def value(self) -> int:
        return ((time.monotonic_ns() - self._start) * PM_TIMER_HZ // 1_000_000_000) & 0xFF_FFFF

    def read(self, offset: int, size: int) -> int:
        return (self.value() >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        pass  # read-only


SLP_EN = 1 << 13
SLP_TYP_SHIFT = 10
S3_SLP_TYP = 1  # the value this FADT's (absent) \\_S3 package would give; kvm-unit-tests writes 1
FACS_WAKING_VECTOR = FACS_ADDR + 12


class Pm1Registers:
    """PM1a event (status, enable) and control blocks.

    A write of SLP_EN with SLP_TYP = 1 (S3) calls `on_sleep(1)`: the machine
    then "resumes" the boot CPU at FACS.firmware_waking_vector in real mode,
    as firmware does after a wake event (ACPI 1.0b, 9.3.2).
    """

    def __init__(self, on_sleep: "Callable[[int], None] | None" = None) -> None:
        self.data = bytearray(8)  # 0-1 status, 2-3 enable, 4-5 control
        self.on_sleep = on_sleep

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        raw = value.to_bytes(size, "little")
        if offset < 2:  # status bits are write-1-to-clear
            for i, b in enumerate(raw[:2 - offset]):
                self.data[offset + i] &= ~b & 0xFF
            return
        self.data[offset:offset + size] = raw
        if offset <= 4 < offset + size and self.on_sleep is not None:
            control = int.from_bytes(self.data[4:6], "little")
            if control & SLP_EN:
                self.data[5] &= ~(SLP_EN >> 8) & 0xFF  # SLP_EN reads as 0
                self.on_sleep((control >> SLP_TYP_SHIFT) & 7)
