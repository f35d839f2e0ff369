"""The CMOS RTC model: what Linux's mach_get_cmos_time and rtc_cmos read and write."""

from __future__ import annotations

import calendar

from kvmpy.devices.rtc import (B_BINARY, B_SET, DATA, DAY, HOURS, INDEX, MINUTES, MONTH, REG_A, REG_B,
                               REG_C, REG_D, SECONDS, YEAR, CENTURY, CmosRtc)

# 2026-12-02 03:04:05 UTC
NOW = calendar.timegm((2026, 12, 2, 3, 4, 5, 0, 0, 0))


def _rtc(now: float = NOW) -> CmosRtc:
    return CmosRtc(clock=lambda: now)


def _read(rtc: CmosRtc, index: int) -> int:
    rtc.write(INDEX, 1, index)
    return rtc.read(DATA, 1)


def _write(rtc: CmosRtc, index: int, value: int) -> None:
    rtc.write(INDEX, 1, index)
    rtc.write(DATA, 1, value)


def test_time_reads_as_bcd_host_utc():
    rtc = _rtc()
    assert [_read(rtc, r) for r in (SECONDS, MINUTES, HOURS, DAY, MONTH, YEAR, CENTURY)] == \
        [0x05, 0x04, 0x03, 0x02, 0x12, 0x26, 0x20]


def test_update_in_progress_is_set_only_at_the_start_of_each_second():
    assert not _read(_rtc(NOW + 0.5), REG_A) & 0x80
    assert _read(_rtc(NOW + 0.001), REG_A) & 0x80


def test_a_poller_sees_update_in_progress_rise_and_fall():
    clock = [NOW + 0.9]
    rtc = CmosRtc(clock=lambda: clock[0])
    seen = []
    for _ in range(40):
        seen.append(bool(_read(rtc, REG_A) & 0x80))
        clock[0] += 0.003
    assert False in seen and True in seen and seen.index(True) < len(seen) - 1 - seen[::-1].index(True) + 1


def test_register_d_reports_valid_ram_and_time():
    assert _read(_rtc(), REG_D) == 0x80


def test_binary_mode_reads_binary_values():
    rtc = _rtc()
    _write(rtc, REG_B, _read(rtc, REG_B) | B_BINARY)
    assert _read(rtc, MINUTES) == 4 and _read(rtc, MONTH) == 12


def test_the_nmi_mask_bit_of_the_index_is_not_part_of_it():
    rtc = _rtc()
    rtc.write(INDEX, 1, 0x80 | MONTH)
    assert rtc.read(DATA, 1) == 0x12


def test_cmos_ram_bytes_read_back():
    rtc = _rtc()
    _write(rtc, 0x40, 0x5A)
    assert _read(rtc, 0x40) == 0x5A


def test_setting_the_time_with_the_set_bit_moves_the_guest_clock():
    clock = [float(NOW)]
    rtc = CmosRtc(clock=lambda: clock[0])
    _write(rtc, REG_B, _read(rtc, REG_B) | B_SET)
    _write(rtc, HOURS, 0x10)
    _write(rtc, MINUTES, 0x30)
    assert _read(rtc, HOURS) == 0x10  # the staged value while SET is on
    _write(rtc, REG_B, _read(rtc, REG_B) & ~B_SET)
    clock[0] += 61
    assert (_read(rtc, HOURS), _read(rtc, MINUTES), _read(rtc, SECONDS)) == (0x10, 0x31, 0x06)


def test_an_impossible_date_leaves_the_clock_alone():
    rtc = _rtc()
    _write(rtc, MONTH, 0x13)
    assert _read(rtc, MONTH) == 0x12


def test_register_c_clears_on_read_and_is_read_only():
    rtc = _rtc()
    _write(rtc, REG_C, 0xFF)
    assert _read(rtc, REG_C) == 0


def test_snapshot_state_round_trips_the_clock_offset_and_ram():
    clock = [float(NOW)]
    rtc = CmosRtc(clock=lambda: clock[0])
    _write(rtc, HOURS, 0x11)
    _write(rtc, 0x40, 0x77)
    state = rtc.snapshot_state()
    clone = CmosRtc(clock=lambda: clock[0])
    clone.restore_state(state)
    assert (_read(clone, HOURS), _read(clone, 0x40)) == (0x11, 0x77)
