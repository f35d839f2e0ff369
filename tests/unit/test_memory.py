"""GuestMemory: layout, bounds-checked access, parse_size and the page walk."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy._kvm import ffi
from kvmpy.errors import GuestMemoryError
from kvmpy.memory import MMIO_HOLE_END, MMIO_HOLE_START, GuestMemory, parse_size

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@pytest.fixture
def mem():
    m = GuestMemory(4 * MiB)
    yield m
    m.close()


def test_write_then_read_round_trips(mem):
    mem.write(0x1234, b"kvmpy")
    assert mem.read(0x1234, 5) == b"kvmpy"


def test_read_across_the_end_of_ram_raises(mem):
    with pytest.raises(GuestMemoryError, match=r"\[0x3ffffe, 0x400002\) is not guest RAM"):
        mem.read(4 * MiB - 2, 4)


def test_write_across_the_end_of_ram_raises_and_writes_nothing(mem):
    with pytest.raises(GuestMemoryError):
        mem.write(4 * MiB - 2, b"\x11\x22\x33\x44")
    assert mem.read(4 * MiB - 2, 2) == b"\0\0"


def test_access_spanning_two_adjacent_regions_raises():
    with GuestMemory(0) as m:
        m.add_region(0, 0x1000)
        m.add_region(0x1000, 0x1000)
        with pytest.raises(GuestMemoryError):
            m.read(0xFFE, 4)


def test_large_size_is_split_around_the_mmio_hole():
    with GuestMemory("5G") as m:
        assert m.ram_ranges() == [(0, 3 * GiB), (4 * GiB, 2 * GiB)]
        assert m.size == 5 * GiB


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    raise AssertionError("no VmRSS in /proc/self/status")  # pragma: no cover


def test_creating_5_gib_does_not_touch_the_memory():
    before = _rss_bytes()
    with GuestMemory("5G") as m:
        m.write_u64(4 * GiB + 8, 1)  # one page touched on purpose
        grown = _rss_bytes() - before
    assert grown < 64 * MiB


def test_access_in_the_mmio_hole_raises():
    with GuestMemory("5G") as m:
        for gpa in (MMIO_HOLE_START, 0xFEC0_0000, MMIO_HOLE_END - 1):
            with pytest.raises(GuestMemoryError):
                m.read_u8(gpa)


def test_ram_above_4_gib_is_addressable():
    with GuestMemory("5G") as m:
        m.write_u32(MMIO_HOLE_END, 0xFEED)
        assert m.read_u32(MMIO_HOLE_END) == 0xFEED


def test_overlapping_region_is_refused_naming_the_slot(mem):
    with pytest.raises(GuestMemoryError, match=r"overlaps slot 0 \[0x0, 0x400000\)"):
        mem.add_region(3 * MiB, 2 * MiB)


def test_unaligned_region_is_refused(mem):
    with pytest.raises(GuestMemoryError, match="not page aligned"):
        mem.add_region(8 * MiB + 1, 4096)


def test_size_not_a_multiple_of_a_page_is_refused():
    with pytest.raises(GuestMemoryError, match="multiple of 4 KiB"):
        GuestMemory(4097)


def test_new_regions_get_the_next_slot_number(mem):
    r = mem.add_region(8 * MiB, 4096, readonly=True)
    assert (r.slot, r.readonly) == (1, True)


@pytest.mark.parametrize("text,size", [("256M", 256 * MiB), ("1G", GiB), ("4096", 4096),
                                       ("0x1000", 4096), ("2GiB", 2 * GiB), ("64k", 64 * KiB),
                                       ("1.5G", 3 * GiB // 2), (512, 512)])
def test_parse_size_accepts(text, size):
    assert parse_size(text) == size


def test_parse_size_rejects_nonsense_naming_the_input():
    with pytest.raises(ValueError, match="'lots'"):
        parse_size("lots")


def test_thp_flag_marks_the_mapping_madv_hugepage():
    with GuestMemory(4 * MiB, thp=True) as m:
        region = m.regions[0]
        buf = ffi.from_buffer(region.mapping)
        start = int(ffi.cast("uintptr_t", buf))
        ffi.release(buf)
        assert "hg" in _vm_flags(start)


def test_without_thp_flag_the_mapping_is_not_madv_hugepage():
    with GuestMemory(4 * MiB) as m:
        buf = ffi.from_buffer(m.regions[0].mapping)
        start = int(ffi.cast("uintptr_t", buf))
        ffi.release(buf)
        assert "hg" not in _vm_flags(start)


def _vm_flags(start: int) -> list[str]:
    """VmFlags of the mapping that starts at `start`, from /proc/self/smaps."""
    current = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                current = int(head.split("-")[0], 16)
            elif head == "VmFlags:" and current == start:
                return line.split()[1:]
    raise AssertionError(f"no mapping at {start:#x}")  # pragma: no cover


# -- page walks -----------------------------------------------------------------

P, RW, PS = 1, 2, 1 << 7
CR0_PG = 1 << 31
CR4_PSE, CR4_PAE = 1 << 4, 1 << 5
EFER_LMA = 1 << 10


def _idx(gva: int, shift: int) -> int:
    return (gva >> shift) & 0x1FF


@pytest.fixture
def four_level(mem):
    """4-level tables at 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD), 0x4000 (PT) mapping
    a 4 KiB page, a 2 MiB page and a 1 GiB page."""
    gva_4k, gva_2m, gva_1g = 0x7F80_1234_5000, 0x7F80_1260_0000, 0x7F80_8000_0000
    mem.write_u64(0x1000 + _idx(gva_4k, 39) * 8, 0x2000 | P | RW)
    mem.write_u64(0x2000 + _idx(gva_4k, 30) * 8, 0x3000 | P | RW)
    mem.write_u64(0x3000 + _idx(gva_4k, 21) * 8, 0x4000 | P | RW)
    mem.write_u64(0x4000 + _idx(gva_4k, 12) * 8, 0x30_0000 | P | RW)
    mem.write_u64(0x3000 + _idx(gva_2m, 21) * 8, 0x20_0000 | P | RW | PS)
    mem.write_u64(0x2000 + _idx(gva_1g, 30) * 8, 0x1_4000_0000 | P | RW | PS)
    return mem, gva_4k, gva_2m, gva_1g


def _walk64(mem, gva):
    return mem.translate(gva, 0x1000, cr0=CR0_PG | 1, cr4=CR4_PAE, efer=EFER_LMA)


def test_four_level_walk_through_a_4k_page(four_level):
    mem, gva_4k, _, _ = four_level
    assert _walk64(mem, gva_4k + 0xABC) == 0x30_0ABC


def test_four_level_walk_through_a_2m_page(four_level):
    mem, _, gva_2m, _ = four_level
    assert _walk64(mem, gva_2m + 0x1_2345) == 0x21_2345


def test_four_level_walk_through_a_1g_page(four_level):
    mem, _, _, gva_1g = four_level
    assert _walk64(mem, gva_1g + 0x3ABC_DEF0) == 0x1_7ABC_DEF0


def test_four_level_walk_of_a_non_present_pte_raises(four_level):
    mem, gva_4k, _, _ = four_level
    with pytest.raises(GuestMemoryError, match="not present"):
        _walk64(mem, gva_4k + 0x1000)


def test_four_level_walk_of_a_non_present_pml4_entry_raises(four_level):
    mem, *_ = four_level
    with pytest.raises(GuestMemoryError, match="bit 39 not present"):
        _walk64(mem, 0x1000_0000_0000)


def test_walk_with_tables_outside_ram_raises(mem):
    with pytest.raises(GuestMemoryError):
        mem.translate(0x1000, 0x8000_0000, cr0=CR0_PG | 1, cr4=CR4_PAE, efer=EFER_LMA)


def test_pae_walk_through_4k_and_2m_pages(mem):
    # PDPT (4 entries, 32-byte aligned) at 0x1020, PD at 0x2000, PT at 0x3000.
    mem.write_u64(0x1020 + 2 * 8, 0x2000 | P)
    mem.write_u64(0x2000 + 3 * 8, 0x3000 | P | RW)
    mem.write_u64(0x3000 + 5 * 8, 0x12_3000 | P | RW)
    mem.write_u64(0x2000 + 4 * 8, 0x2_0020_0000 | P | RW | PS)
    base = 2 << 30
    cr0, cr4 = CR0_PG | 1, CR4_PAE
    assert mem.translate(base + (3 << 21) + (5 << 12) + 0x77, 0x1020, cr0=cr0, cr4=cr4, efer=0) == 0x12_3077
    assert mem.translate(base + (4 << 21) + 0x1234, 0x1020, cr0=cr0, cr4=cr4, efer=0) == 0x2_0020_1234


def test_pae_walk_of_a_non_present_pdpte_raises(mem):
    with pytest.raises(GuestMemoryError, match="PDPTE not present"):
        mem.translate(0xC000_0000, 0x1000, cr0=CR0_PG | 1, cr4=CR4_PAE, efer=0)


def test_32_bit_walk_through_a_4k_page(mem):
    mem.write_u32(0x1000 + 0x301 * 4, 0x2000 | P | RW)
    mem.write_u32(0x2000 + 0x2A * 4, 0x0033_3000 | P | RW)
    gva = (0x301 << 22) | (0x2A << 12) | 0x456
    assert mem.translate(gva, 0x1000, cr0=CR0_PG | 1, cr4=0, efer=0) == 0x0033_3456


def test_32_bit_walk_through_a_4m_page_with_pse(mem):
    mem.write_u32(0x1000 + 0x302 * 4, 0x0080_0000 | P | RW | PS)
    gva = (0x302 << 22) | 0x12_3456
    assert mem.translate(gva, 0x1000, cr0=CR0_PG | 1, cr4=CR4_PSE, efer=0) == 0x0092_3456


def test_32_bit_walk_of_a_non_present_pde_raises(mem):
    with pytest.raises(GuestMemoryError, match="page directory entry not present"):
        mem.translate(0x1234_5678, 0x1000, cr0=CR0_PG | 1, cr4=0, efer=0)


def test_without_paging_the_address_is_the_linear_address_truncated_to_32_bits(mem):
    assert mem.translate(0x1_2345_6789, 0, cr0=1, cr4=0, efer=0) == 0x2345_6789


# -- property: bounds are exact ---------------------------------------------------

REGIONS = [(0, 0x10000), (0x20000, 0x8000)]


@pytest.fixture(scope="module")
def two_regions():
    m = GuestMemory(0)
    for gpa, size in REGIONS:
        m.add_region(gpa, size)
    yield m
    m.close()


def _inside(gpa: int, size: int) -> bool:
    return any(base <= gpa and gpa + size <= base + length for base, length in REGIONS)


@settings(max_examples=300, deadline=None)
@given(gpa=st.integers(0, 0x30000), data=st.binary(min_size=1, max_size=64))
def test_random_accesses_round_trip_inside_ram_and_raise_outside(two_regions, gpa, data):
    if _inside(gpa, len(data)):
        two_regions.write(gpa, data)
        assert two_regions.read(gpa, len(data)) == data
    else:
        with pytest.raises(GuestMemoryError):
            two_regions.write(gpa, data)
        with pytest.raises(GuestMemoryError):
            two_regions.read(gpa, len(data))


@settings(max_examples=100, deadline=None)
@given(gpa=st.integers(0, 0x30000 - 8), value=st.integers(0, (1 << 64) - 1))
def test_random_u64_accesses_match_struct_packing(two_regions, gpa, value):
    if _inside(gpa, 8):
        two_regions.write_u64(gpa, value)
        assert two_regions.read(gpa, 8) == struct.pack("<Q", value)
        assert two_regions.read_u64(gpa) == value
    else:
        with pytest.raises(GuestMemoryError):
            two_regions.read_u64(gpa)
