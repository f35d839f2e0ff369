"""QEMU test devices and ACPI tables, without /dev/kvm."""

from __future__ import annotations

import struct

from kvmpy.bus import mmio_bus, pio_bus
from kvmpy.devices.fw_cfg import FwCfg
from kvmpy.devices.testdev import DebugExit, PcTestDev, debug_exit_status
from kvmpy.memory import GuestMemory
from kvmpy.x86 import acpi


def test_debug_exit_status_is_code_shifted_with_bit_zero():
    assert [debug_exit_status(c) for c in (0, 1, 38, 63)] == [1, 3, 77, 127]
    got = []
    d = DebugExit(got.append)
    d.write(0, 4, 38)
    assert got == [38] and d.status == 77


def _fw_read(dev: FwCfg, key: int, n: int) -> bytes:
    dev.write(0, 2, key)
    return bytes(dev.read(1, 1) for _ in range(n))


def test_fw_cfg_signature_cpus_ram_and_absent_keys():
    dev = FwCfg(ram_size=128 << 20, nb_cpus=3)
    assert _fw_read(dev, 0x00, 4) == b"QEMU"
    assert struct.unpack("<H", _fw_read(dev, 0x05, 2))[0] == 3
    assert struct.unpack("<Q", _fw_read(dev, 0x03, 8))[0] == 128 << 20
    assert _fw_read(dev, 0x11, 8) == bytes(8)  # kvm-unit-tests' MAX_RAM: 0 = no limit
    assert struct.unpack("<I", _fw_read(dev, 0x01, 4))[0] == 1  # no DMA interface


def test_fw_cfg_select_resets_the_offset_and_reads_past_the_end_are_zero():
    dev = FwCfg(ram_size=0, nb_cpus=1)
    assert _fw_read(dev, 0x00, 6) == b"QEMU\0\0"
    assert _fw_read(dev, 0x00, 2) == b"QE"


def test_pc_testdev_scratch_register_merges_byte_lanes():
    t = PcTestDev()
    t.scratch.write(0, 4, 0x11223344)
    t.scratch.write(1, 1, 0xAA)
    assert t.scratch.read(0, 4) == 0x1122AA44
    assert t.scratch.read(2, 2) == 0x1122
    assert t.scratch_bytes.read(0, 4) == 0x1122AA44  # the byte-split variant sees the same data


def test_pc_testdev_irq_ports_drive_lines():
    lines = []
    t = PcTestDev(irq_line=lambda n, level: lines.append((n, level)))
    pio, mmio = pio_bus(), mmio_bus()
    t.register(pio, mmio)
    pio.write(0x2000 + 14, 1, 1)
    pio.write(0x2000 + 14, 1, 0)
    assert lines == [(14, 1), (14, 0)]


def test_pc_testdev_iomem_reads_back_writes_of_any_size():
    t = PcTestDev()
    pio, mmio = pio_bus(), mmio_bus()
    t.register(pio, mmio)
    mmio.write(0xFF00_0010, 8, 0x0102030405060708)
    assert mmio.read(0xFF00_0012, 2) == 0x0506
    assert mmio.read(0xFF00_FFFF, 1) == 0
    pio.write(0xE4, 4, 0x1000)
    assert t.flushed == [0x1000]


def test_acpi_rsdp_rsdt_fadt_are_found_like_kvm_unit_tests_and_checksum():
    with GuestMemory(2 << 20) as mem:
        acpi.write_acpi_tables(mem)
        rsdp = next(a for a in range(0xE0000, 0x100000, 16) if mem.read(a, 8) == b"RSD PTR ")
        assert sum(mem.read(rsdp, 20)) & 0xFF == 0
        rsdt = mem.read_u32(rsdp + 16)
        assert mem.read(rsdt, 4) == b"RSDT"
        length = mem.read_u32(rsdt + 4)
        assert sum(mem.read(rsdt, length)) & 0xFF == 0
        fadt = mem.read_u32(rsdt + 36)
        assert mem.read(fadt, 4) == b"FACP" and sum(mem.read(fadt, 116)) & 0xFF == 0
        assert mem.read_u32(fadt + 76) == acpi.PM_TMR_BLK  # pm_tmr_blk
        assert mem.read(mem.read_u32(fadt + 36), 4) == b"FACS"


def test_pm_timer_counts_up_at_3_58_mhz():
    import time
    t = acpi.PmTimer()
    a = t.read(0, 4)
    time.sleep(0.01)
    b = t.read(0, 4)
    assert 0 < (b - a) & 0xFFFFFF < acpi.PM_TIMER_HZ  # some ticks, less than a second's worth


def test_pm1_control_write_with_slp_en_requests_the_sleep_type():
    got = []
    pm1 = acpi.Pm1Registers(on_sleep=got.append)
    pm1.write(4, 2, 0x2400)  # SLP_TYP = 1 (S3), SLP_EN
    assert got == [1]
    assert pm1.read(4, 2) == 0x0400  # SLP_EN is write-only
    pm1.write(0, 2, 0xFFFF)  # status bits are write-1-to-clear
    assert pm1.read(0, 2) == 0


def test_cmos_rtc_uip_toggles_and_reg_c_clears():
    import time

    from kvmpy.devices.rtc import CmosRtc
    now = [1000.5]
    rtc = CmosRtc(clock=lambda: now[0])  # a clock the test moves: no race with a loaded host
    seen = set()
    for t in (1000.5, 1001.005, 1001.5):  # mid-second, inside the 10 ms update window, mid-second
        now[0] = t
        rtc.write(0, 1, 0x0A)
        seen.add(rtc.read(1, 1) & 0x80)
    assert seen == {0, 0x80}
    rtc.write(0, 1, 0x0C)
    assert rtc.read(1, 1) == 0
    rtc.write(0, 1, 0x01)
    rtc.write(1, 1, 0xC0)
    assert rtc.read(1, 1) == 0xC0
