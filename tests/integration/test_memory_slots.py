"""Memory slots as the guest sees them: read-only slots, dirty logging, page walks."""

from __future__ import annotations

import pytest

from guests import RecordingPort
from kvmpy.errors import GuestMemoryError
from kvmpy.exits import HltExit
from kvmpy.x86 import modes

ROM = 0x80_0000
LOGGED = 0x100_0000
LOGGED_PAGES = 64
ROM_WORD = 0x1234_ABCD


def _rom_guest(guest):
    g = guest("64", f"""
        mov {ROM:#x}, %eax
        out %eax, $0x14
        movl $0xdeadbeef, {ROM + 0x10:#x}
        hlt
    """, extra_regions={"rom": dict(gpa=ROM, size=0x1000, readonly=True)})
    g.mem.write_u32(ROM, ROM_WORD)
    g.mem.write_u32(ROM + 0x10, 0x5555_5555)
    dev = RecordingPort()
    g.mmio.register(ROM, 0x1000, dev, "rom writes")
    return g, dev


def test_guest_read_from_readonly_slot_returns_its_contents(guest):
    g, _ = _rom_guest(guest)
    assert isinstance(g.run(), HltExit)
    assert g.port.values(4) == [ROM_WORD]


def test_guest_write_to_readonly_slot_becomes_an_mmio_exit(guest):
    g, dev = _rom_guest(guest)
    g.run()
    assert dev.writes == [(0x10, 4, 0xDEAD_BEEF)]


def test_guest_write_to_readonly_slot_leaves_the_memory_unchanged(guest):
    g, _ = _rom_guest(guest)
    g.run()
    assert g.mem.read_u32(ROM + 0x10) == 0x5555_5555


def _logged_guest(guest, body):
    return guest("64", body + "\nhlt", extra_regions={
        "logged": dict(gpa=LOGGED, size=LOGGED_PAGES * 4096, dirty_log=True)})


def test_dirty_log_reports_exactly_the_pages_the_guest_wrote(guest):
    pages = (3, 17, 40)
    g = _logged_guest(guest, "\n".join(f"movb $1, {LOGGED + p * 4096 + 0x80:#x}" for p in pages))
    g.run()
    assert g.vm.get_dirty_log(g.regions["logged"]) == [LOGGED // 4096 + p for p in pages]


def test_dirty_log_is_empty_on_a_second_call_without_writes(guest):
    g = _logged_guest(guest, f"movb $1, {LOGGED + 5 * 4096:#x}")
    g.run()
    g.vm.get_dirty_log(g.regions["logged"])
    assert g.vm.get_dirty_log(g.regions["logged"]) == []


def test_dirty_log_ignores_guest_reads(guest):
    g = _logged_guest(guest, f"mov {LOGGED + 9 * 4096:#x}, %rax")
    g.run()
    assert g.vm.get_dirty_log(g.regions["logged"]) == []


REMAPPED_GVA = 0x4000_0000
REMAPPED_GPA = 0x20_0000


def _remap(mem):
    # GVA 1 GiB -> GPA 2 MiB with one 2 MiB page; GVA 1 GiB + 2 MiB unmapped.
    pd = modes.PD_ADDR + 4096
    mem.write_u64(pd, REMAPPED_GPA | modes.PTE_P | modes.PTE_RW | modes.PTE_PS)
    mem.write_u64(pd + 8, 0)


def _translation_guest(guest):
    g = guest("64", "hlt", setup_memory=_remap)
    g.run()
    return g, g.vcpu.get_sregs()


@pytest.mark.parametrize("gva", [0x10000, 0x12_3456, 0x3FFF_F008, 0xFEC0_0010,
                                 REMAPPED_GVA, REMAPPED_GVA + 0x1_2345])
def test_guest_memory_page_walk_agrees_with_kvm_translate(guest, gva):
    g, s = _translation_guest(guest)
    walked = g.mem.translate(gva, s.cr3, cr0=s.cr0, cr4=s.cr4, efer=s.efer)
    assert walked == g.vcpu.translate(gva)


def test_remapped_page_translates_to_its_new_frame(guest):
    g, s = _translation_guest(guest)
    assert g.vcpu.translate(REMAPPED_GVA + 0x777) == REMAPPED_GPA + 0x777


def test_unmapped_page_is_none_for_kvm_and_an_error_for_the_walk(guest):
    g, s = _translation_guest(guest)
    gva = REMAPPED_GVA + (2 << 20) + 0x10
    assert g.vcpu.translate(gva) is None
    with pytest.raises(GuestMemoryError, match="not present"):
        g.mem.translate(gva, s.cr3, cr0=s.cr0, cr4=s.cr4, efer=s.efer)
