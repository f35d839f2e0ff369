"""kvmpy.x86.mptable: the written table parsed back the way Linux's mpparse.c reads it."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest

from kvmpy.errors import BootError
from kvmpy.memory import GuestMemory
from kvmpy.x86.mptable import MPTABLE_BASE, MPTABLE_LIMIT, max_cpus, mptable_size, write_mptable

MiB = 1 << 20
# Entry sizes by type, as Linux's smp_read_mpc skips them.
ENTRY_SIZE = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


@dataclass
class Parsed:
    mpf: bytes
    physptr: int
    header: bytes
    length: int
    count: int
    lapic: int
    cpus: list[tuple[int, int, int]] = field(default_factory=list)  # apicid, version, flags
    buses: list[tuple[int, bytes]] = field(default_factory=list)
    ioapics: list[tuple[int, int, int, int]] = field(default_factory=list)
    intsrc: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    lintsrc: list[tuple[int, int, int]] = field(default_factory=list)
    entries: int = 0


def scan_for_mpf(mem: GuestMemory, base: int, length: int) -> int | None:
    """Linux's smp_scan_config: '_MP_' on a 16-byte boundary, length 1, rev 1/4, checksum 0."""
    for off in range(base, base + length, 16):
        b = mem.read(off, 16)
        if b[:4] == b"_MP_" and b[8] == 1 and b[9] in (1, 4) and sum(b) & 0xFF == 0:
            return off
    return None


def parse(mem: GuestMemory, base: int = MPTABLE_BASE) -> Parsed:
    mpf = mem.read(base, 16)
    physptr = struct.unpack_from("<I", mpf, 4)[0]
    header = mem.read(physptr, 44)
    sig, length, spec, _, oem, product, _, _, count, lapic = struct.unpack_from(
        "<4sHBB8s12sIHHI", header)
    assert sig == b"PCMP"
    p = Parsed(mpf, physptr, header, length, count, lapic)
    pos, end = physptr + 44, physptr + length
    while pos < end:
        t = mem.read_u8(pos)
        raw = mem.read(pos, ENTRY_SIZE[t])
        if t == 0:
            p.cpus.append(struct.unpack_from("<xBBB", raw))
        elif t == 1:
            p.buses.append(struct.unpack_from("<xB6s", raw))
        elif t == 2:
            p.ioapics.append(struct.unpack_from("<xBBBI", raw))
        elif t == 3:
            p.intsrc.append(struct.unpack_from("<xBHBBBB", raw))
        else:
            irqtype, _, _, _, dest, lint = struct.unpack_from("<xBHBBBB", raw)
            p.lintsrc.append((irqtype, dest, lint))
        p.entries += 1
        pos += ENTRY_SIZE[t]
    assert pos == end
    return p


@pytest.fixture
def mem():
    with GuestMemory(16 * MiB) as m:
        yield m


def test_floating_pointer_is_found_where_linux_scans(mem):
    write_mptable(mem, 2)
    # smp_scan_config(639 * 0x400, 0x400)
    assert scan_for_mpf(mem, 639 * 0x400, 0x400) == MPTABLE_BASE


def test_floating_pointer_fields_and_checksum(mem):
    write_mptable(mem, 1)
    mpf = mem.read(MPTABLE_BASE, 16)
    assert mpf[:4] == b"_MP_"
    assert sum(mpf) & 0xFF == 0
    assert mpf[8] == 1 and mpf[9] == 4  # length in paragraphs, spec 1.4
    assert mpf[11] == 0  # feature1: a configuration table is present
    assert struct.unpack_from("<I", mpf, 4)[0] == MPTABLE_BASE + 16


def test_config_table_header_and_checksum(mem):
    write_mptable(mem, 4)
    p = parse(mem)
    table = mem.read(p.physptr, p.length)
    assert sum(table) & 0xFF == 0
    assert table[6] == 4  # spec revision
    assert table[8:16] == b"KVMPY   " and table[16:28] == b"KVMPY       "
    assert p.lapic == 0xFEE00000
    assert p.count == p.entries == 4 + 1 + 1 + 16 + 2


@pytest.mark.parametrize("ncpus", [1, 2, 8])
def test_one_processor_entry_per_cpu_with_bsp_first(mem, ncpus):
    used = write_mptable(mem, ncpus)
    p = parse(mem)
    assert [c[0] for c in p.cpus] == list(range(ncpus))
    assert all(c[2] & 1 for c in p.cpus)  # enabled
    assert [bool(c[2] & 2) for c in p.cpus] == [True] + [False] * (ncpus - 1)
    assert used == 16 + p.length == mptable_size(ncpus)


def test_bus_and_ioapic_entries(mem):
    write_mptable(mem, 3)
    p = parse(mem)
    assert p.buses == [(0, b"ISA   ")]
    assert p.ioapics == [(3, 0x11, 1, 0xFEC00000)]  # id = ncpus, version, enabled, address


def test_isa_irqs_routed_to_the_same_ioapic_pin(mem):
    write_mptable(mem, 2, ioapic_id=7)
    p = parse(mem)
    # (irqtype, flags, srcbus, srcbusirq, dstapic, dstirq)
    assert p.intsrc == [(0, 0, 0, irq, 7, irq) for irq in range(16)]


def test_local_interrupts_extint_lint0_nmi_lint1(mem):
    write_mptable(mem, 2)
    p = parse(mem)
    # (irqtype, dest apic, lint pin)
    assert p.lintsrc == [(3, 0xFF, 0), (1, 0xFF, 1)]


def test_table_fits_below_ebda_end_at_max_cpus(mem):
    n = max_cpus()
    used = write_mptable(mem, n)
    assert MPTABLE_BASE + used <= MPTABLE_LIMIT
    assert len(parse(mem).cpus) == n


def test_too_many_cpus_is_refused(mem):
    with pytest.raises(BootError, match=f"at most {max_cpus()} CPUs"):
        write_mptable(mem, max_cpus() + 1)


def test_ioapic_id_colliding_with_a_cpu_is_refused(mem):
    with pytest.raises(BootError, match="collides"):
        write_mptable(mem, 4, ioapic_id=2)


def test_custom_base_and_addresses(mem):
    write_mptable(mem, 2, base=0xF0000, ioapic_addr=0xFEC01000, lapic_addr=0xFEE01000,
                  limit=0x100000)
    assert scan_for_mpf(mem, 0xF0000, 0x10000) == 0xF0000
    p = parse(mem, 0xF0000)
    assert p.lapic == 0xFEE01000 and p.ioapics[0][3] == 0xFEC01000
