"""The PC's CMOS real-time clock (Motorola MC146818A) at ports 0x70 (index) and 0x71 (data).

Linux reads it at boot for the wall-clock time (`mach_get_cmos_time`) and
its rtc_cmos driver probes it. Without a device there, every read returns
0xff: "update in progress" never clears and the kernel busy-waits in
`mc146818_avoid_UIP` with `udelay` (measured: several seconds of an
emulated boot on the PVM backend). This model keeps the guest clock at the
host's UTC plus an offset the guest may set, in BCD 24-hour format as a
PC BIOS leaves it, and keeps the other CMOS bytes as RAM. Register A's
"update in progress" bit is set for the first `uip_window` seconds of each
second, as the chip sets it around its once-a-second update (about 2 ms);
the default 10 ms is wide enough for an emulated guest polling for the
transition (kvm-unit-tests' s3 does) and short enough that Linux's
avoid-UIP wait is rare.
"""

from __future__ import annotations

import calendar
import threading
import time
from typing import Callable

INDEX, DATA = 0, 1
SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
B_SET = 0x80  # updates stopped while the guest sets the time
B_24H = 0x02
B_BINARY = 0x04  # data mode: binary instead of BCD
A_DIVIDER_32K = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate
A_UIP = 0x80  # update in progress
D_VALID = 0x80  # "valid RAM and time": the battery is fine

_TIME_FIELDS = (SECONDS, MINUTES, HOURS, DAY, MONTH, YEAR, CENTURY)


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def _unbcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


class CmosRtc:
    """MC146818A RTC and CMOS RAM; `clock` returns the host time (seconds since the epoch, UTC)."""

    def __init__(self, clock: Callable[[], float] = time.time, *, uip_window: float = 0.010) -> None:
        self._clock = clock
        self._uip_window = uip_window
        self._lock = threading.Lock()
        self._index = 0
        self._ram = bytearray(128)
        self._ram[REG_A] = A_DIVIDER_32K
        self._ram[REG_B] = B_24H
        self._ram[REG_D] = D_VALID
        self._offset = 0.0  # guest time - host time, seconds
        self._staged: dict[int, int] = {}  # time fields written while SET is on

    def read(self, offset: int, size: int) -> int:
        if offset != DATA:
            return 0xFF  # the index port is write-only
        with self._lock:
            return self._read_register(self._index)

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if offset == INDEX:
                self._index = value & 0x7F  # bit 7 is the NMI mask, not part of the index
            elif offset == DATA:
                self._write_register(self._index, value)

    # -- registers ------------------------------------------------------------------

    def _encode(self, v: int) -> int:
        return v if self._ram[REG_B] & B_BINARY else _bcd(v)

    def _decode(self, v: int) -> int:
        return v if self._ram[REG_B] & B_BINARY else _unbcd(v)

    def _now(self) -> time.struct_time:
        return time.gmtime(self._clock() + self._offset)

    def _read_register(self, index: int) -> int:
        if index == REG_C:
            value, self._ram[REG_C] = self._ram[REG_C], 0  # interrupt flags clear on read
            return value
        if index == REG_A:
            in_update = (self._clock() + self._offset) % 1.0 < self._uip_window
            return self._ram[REG_A] | (A_UIP if in_update else 0)
        if index in _TIME_FIELDS or index == WEEKDAY:
            if self._ram[REG_B] & B_SET and index in self._staged:
                return self._staged[index]
            t = self._now()
            value = {SECONDS: t.tm_sec, MINUTES: t.tm_min, HOURS: t.tm_hour, WEEKDAY: (t.tm_wday + 1) % 7 + 1,
                     DAY: t.tm_mday, MONTH: t.tm_mon, YEAR: t.tm_year % 100, CENTURY: t.tm_year // 100}[index]
            return self._encode(value)
        return self._ram[index]

    def _write_register(self, index: int, value: int) -> None:
        if index in _TIME_FIELDS or index == WEEKDAY:
            self._staged[index] = value
            if not self._ram[REG_B] & B_SET:
                self._commit_time()
            return
        if index == REG_B:
            was_set = self._ram[REG_B] & B_SET
            self._ram[REG_B] = value
            if was_set and not value & B_SET:
                self._commit_time()
            return
        if index in (REG_C, REG_D):
            return  # read-only status registers
        if index == REG_A:
            value &= 0x7F  # UIP is read-only
        self._ram[index] = value

    def _commit_time(self) -> None:
        """The guest set the clock: keep its time as an offset from the host's."""
        if not self._staged:
            return
        now = self._now()
        current = {SECONDS: now.tm_sec, MINUTES: now.tm_min, HOURS: now.tm_hour, DAY: now.tm_mday,
                   MONTH: now.tm_mon, YEAR: now.tm_year % 100, CENTURY: now.tm_year // 100}
        fields = {k: self._decode(v) for k, v in self._staged.items() if k != WEEKDAY}
        current.update(fields)
        self._staged.clear()
        year = current[CENTURY] * 100 + current[YEAR]
        try:
            guest = calendar.timegm((year, current[MONTH], current[DAY], current[HOURS],
                                     current[MINUTES], current[SECONDS], 0, 0, 0))
        except (ValueError, OverflowError):
            return  # an impossible date: keep the clock as it was, as the chip would not count it
        self._offset = guest - self._clock()

    # -- snapshots (kvmpy/snapshot.py) -------------------------------------------

    def snapshot_state(self) -> dict:
        """The chip's state as JSON-able values; the clock is kept as its offset from the host's."""
        with self._lock:
            return {"index": self._index, "ram": list(self._ram), "offset": self._offset,
                    "staged": {str(k): v for k, v in self._staged.items()}}

    def restore_state(self, state: dict) -> None:
        """Load what `snapshot_state` returned."""
        with self._lock:
            self._index = int(state["index"])
            self._ram = bytearray(state["ram"])
            self._offset = float(state["offset"])
            self._staged = {int(k): int(v) for k, v in state["staged"].items()}
