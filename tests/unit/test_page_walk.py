"""Permission and reserved-bit checks of kvmpy's page walk, on hand-built page tables.

Each test builds 4-level (or 32-bit / PAE) tables mapping one page with the
bits under test and checks the GPA, or the #PF error code and CR2 a CPU
would give (SDM vol. 3A, 4.6 and 4.7). The same cases run natively in a
tiny guest in tests/integration/test_page_walk_native.py.
"""

from __future__ import annotations

import pytest

from kvmpy._kvm import ffi
from kvmpy.assists import Assists
from kvmpy.errors import PageFault
from kvmpy.memory import Access, GuestMemory, PfError
from kvmpy.x86.decode import Fault
from kvmpy.x86.emulate import page_fault_error_code

P, RW, US, PS, XD = 1, 2, 4, 1 << 7, 1 << 63
CR0_PE, CR0_WP, CR0_PG = 1, 1 << 16, 1 << 31
CR4_PSE, CR4_PAE, CR4_SMEP, CR4_SMAP = 1 << 4, 1 << 5, 1 << 20, 1 << 21
EFER_LMA, EFER_NXE = 1 << 10, 1 << 11
PML4, PDPT, PD, PT = 0x1000, 0x2000, 0x3000, 0x4000
GVA = 0x7F80_1234_5000
PAGE = 0x30_0000
UPPER = P | RW | US  # the upper levels allow everything unless a test says otherwise

SUP_READ = Access()
SUP_WRITE = Access(write=True)
SUP_FETCH = Access(fetch=True)
USER_READ = Access(user=True)
USER_WRITE = Access(user=True, write=True)
USER_FETCH = Access(user=True, fetch=True)


def _idx(gva: int, shift: int) -> int:
    return (gva >> shift) & 0x1FF


@pytest.fixture
def mem():
    with GuestMemory(8 << 20) as m:
        yield m


def _map(mem, leaf: int, *, upper: int = UPPER, pd_upper: int | None = None, level: int = 12,
         gva: int = GVA) -> None:
    """PML4 -> PDPT -> PD -> PT for `gva`; `leaf` is the final entry (at `level`: 12, 21 or 30)."""
    mem.write_u64(PML4 + _idx(gva, 39) * 8, PDPT | upper)
    if level == 30:
        mem.write_u64(PDPT + _idx(gva, 30) * 8, leaf)
        return
    mem.write_u64(PDPT + _idx(gva, 30) * 8, PD | upper)
    if level == 21:
        mem.write_u64(PD + _idx(gva, 21) * 8, leaf)
        return
    mem.write_u64(PD + _idx(gva, 21) * 8, PT | (upper if pd_upper is None else pd_upper))
    mem.write_u64(PT + _idx(gva, 12) * 8, leaf)


def _walk(mem, access: Access, *, cr0: int = CR0_PE | CR0_PG | CR0_WP, cr4: int = CR4_PAE,
          efer: int = EFER_LMA | EFER_NXE, maxphyaddr: int = 52, gva: int = GVA + 0x123) -> int:
    return mem.translate(gva, PML4, cr0=cr0, cr4=cr4, efer=efer, access=access, maxphyaddr=maxphyaddr)


def _fault(mem, access: Access, **kw) -> int:
    with pytest.raises(PageFault) as e:
        _walk(mem, access, **kw)
    assert e.value.address == kw.get("gva", GVA + 0x123)  # CR2: the linear address accessed
    return e.value.error_code


# -- present / not present -----------------------------------------------------------

def test_a_permitted_access_returns_the_gpa(mem):
    _map(mem, PAGE | P | RW | US)
    for access in (SUP_READ, SUP_WRITE, SUP_FETCH, USER_READ, USER_WRITE, USER_FETCH):
        assert _walk(mem, access) == PAGE + 0x123


@pytest.mark.parametrize("access, code", [
    (SUP_READ, 0), (SUP_WRITE, PfError.W), (USER_READ, PfError.U), (USER_WRITE, PfError.W | PfError.U),
    (USER_FETCH, PfError.U | PfError.ID), (SUP_FETCH, PfError.ID)])
def test_not_present_gives_p0_with_the_access_bits(mem, access, code):
    _map(mem, PAGE | RW | US)  # P clear in the PTE
    assert _fault(mem, access) == code


def test_not_present_upper_level_stops_the_walk(mem):
    _map(mem, PAGE | P | RW | US, pd_upper=RW | US)
    assert _fault(mem, USER_WRITE) == PfError.W | PfError.U


# -- R/W and CR0.WP ----------------------------------------------------------------------

def test_user_write_to_a_read_only_page_faults_whatever_wp(mem):
    _map(mem, PAGE | P | US)
    for cr0 in (CR0_PE | CR0_PG | CR0_WP, CR0_PE | CR0_PG):
        assert _fault(mem, USER_WRITE, cr0=cr0) == PfError.P | PfError.W | PfError.U
    assert _walk(mem, USER_READ) == PAGE + 0x123


def test_read_only_anywhere_in_the_walk_makes_the_page_read_only(mem):
    _map(mem, PAGE | P | RW | US, pd_upper=P | US)
    assert _fault(mem, USER_WRITE) == PfError.P | PfError.W | PfError.U


def test_supervisor_write_to_a_read_only_page_faults_only_with_wp(mem):
    _map(mem, PAGE | P)
    assert _fault(mem, SUP_WRITE) == PfError.P | PfError.W
    assert _walk(mem, SUP_WRITE, cr0=CR0_PE | CR0_PG) == PAGE + 0x123


# -- U/S, SMAP, SMEP ---------------------------------------------------------------------

def test_user_access_to_a_supervisor_page_faults(mem):
    _map(mem, PAGE | P | RW)
    assert _fault(mem, USER_READ) == PfError.P | PfError.U
    assert _fault(mem, USER_FETCH) == PfError.P | PfError.U | PfError.ID


def test_supervisor_bit_clear_in_an_upper_level_makes_the_page_supervisor(mem):
    _map(mem, PAGE | P | RW | US, upper=P | RW)
    assert _fault(mem, USER_READ) == PfError.P | PfError.U


def test_smap_refuses_supervisor_data_access_to_user_pages_unless_ac(mem):
    _map(mem, PAGE | P | RW | US)
    cr4 = CR4_PAE | CR4_SMAP
    assert _fault(mem, SUP_READ, cr4=cr4) == PfError.P
    assert _fault(mem, SUP_WRITE, cr4=cr4) == PfError.P | PfError.W
    assert _walk(mem, Access(ac=True), cr4=cr4) == PAGE + 0x123
    assert _walk(mem, Access(write=True, ac=True), cr4=cr4) == PAGE + 0x123
    # Implicit supervisor accesses (descriptor tables) are refused even with AC set.
    assert _fault(mem, Access(implicit=True, ac=True), cr4=cr4) == PfError.P
    assert _walk(mem, SUP_READ) == PAGE + 0x123  # no SMAP: allowed


def test_smap_with_ac_still_honours_wp(mem):
    _map(mem, PAGE | P | US)
    assert _fault(mem, Access(write=True, ac=True), cr4=CR4_PAE | CR4_SMAP) == PfError.P | PfError.W


def test_smep_refuses_supervisor_fetches_from_user_pages(mem):
    _map(mem, PAGE | P | RW | US)
    assert _fault(mem, SUP_FETCH, cr4=CR4_PAE | CR4_SMEP) == PfError.P | PfError.ID
    assert _walk(mem, SUP_FETCH) == PAGE + 0x123
    assert _walk(mem, SUP_READ, cr4=CR4_PAE | CR4_SMEP) == PAGE + 0x123  # data reads are SMAP's business


# -- NX ----------------------------------------------------------------------------------

def test_nx_refuses_fetches_only(mem):
    _map(mem, PAGE | P | RW | US | XD)
    assert _fault(mem, USER_FETCH) == PfError.P | PfError.U | PfError.ID
    assert _fault(mem, SUP_FETCH) == PfError.P | PfError.ID
    assert _walk(mem, USER_WRITE) == PAGE + 0x123


def test_xd_in_an_upper_level_makes_the_page_no_execute(mem):
    _map(mem, PAGE | P | RW | US, pd_upper=UPPER | XD)
    assert _fault(mem, SUP_FETCH) == PfError.P | PfError.ID


def test_xd_without_nxe_is_a_reserved_bit(mem):
    _map(mem, PAGE | P | RW | US | XD)
    assert _fault(mem, USER_READ, efer=EFER_LMA) == PfError.P | PfError.U | PfError.RSVD
    # Without NXE (and SMEP) a fetch fault does not set I/D.
    assert _fault(mem, USER_FETCH, efer=EFER_LMA) == PfError.P | PfError.U | PfError.RSVD


# -- reserved bits ----------------------------------------------------------------------

def test_address_bits_at_or_above_maxphyaddr_are_reserved(mem):
    _map(mem, PAGE | (1 << 46) | P | RW | US)
    assert _fault(mem, USER_WRITE, maxphyaddr=46) == PfError.P | PfError.W | PfError.U | PfError.RSVD
    assert _walk(mem, USER_WRITE, maxphyaddr=47) == PAGE + (1 << 46) + 0x123


def test_reserved_bit_in_an_upper_level_is_found_before_a_lower_not_present(mem):
    _map(mem, PAGE | RW | US, pd_upper=UPPER | (1 << 40))
    assert _fault(mem, SUP_READ, maxphyaddr=39) == PfError.P | PfError.RSVD


def test_ps_is_reserved_in_a_pml4_entry(mem):
    _map(mem, PAGE | P | RW | US, upper=UPPER)
    mem.write_u64(PML4 + _idx(GVA, 39) * 8, PDPT | UPPER | PS)
    assert _fault(mem, SUP_READ) == PfError.P | PfError.RSVD


def test_large_page_address_bits_below_the_page_size_are_reserved(mem):
    gva = GVA & ~((1 << 21) - 1)
    _map(mem, 0x20_0000 | (1 << 13) | P | RW | US | PS, level=21, gva=gva)
    assert _fault(mem, SUP_READ, gva=gva) == PfError.P | PfError.RSVD
    _map(mem, 0x20_0000 | (1 << 12) | P | RW | US | PS, level=21, gva=gva)  # bit 12 is PAT: allowed
    assert _walk(mem, SUP_READ, gva=gva + 5) == 0x20_0005
    gva1g = GVA & ~((1 << 30) - 1)
    _map(mem, (1 << 30) | (1 << 29) | P | RW | US | PS, level=30, gva=gva1g)
    assert _fault(mem, SUP_READ, gva=gva1g) == PfError.P | PfError.RSVD


def test_32_bit_paging_checks_rw_and_us_and_pse_reserved_bits(mem):
    cr0, cr4, efer = CR0_PE | CR0_PG | CR0_WP, CR4_PSE, 0
    gva = (0x301 << 22) | (0x2A << 12) | 0x456
    mem.write_u32(0x1000 + 0x301 * 4, 0x2000 | P | RW | US)
    mem.write_u32(0x2000 + 0x2A * 4, 0x33_3000 | P | US)
    kw = dict(cr0=cr0, cr4=cr4, efer=efer)
    assert mem.translate(gva, 0x1000, access=USER_READ, **kw) == 0x33_3456
    with pytest.raises(PageFault) as e:
        mem.translate(gva, 0x1000, access=USER_WRITE, **kw)
    assert e.value.error_code == PfError.P | PfError.W | PfError.U
    mem.write_u32(0x1000 + 0x302 * 4, 0x80_0000 | (1 << 21) | P | RW | PS)  # bit 21 of a 4 MiB PDE
    with pytest.raises(PageFault) as e:
        mem.translate(0x302 << 22, 0x1000, access=SUP_READ, **kw)
    assert e.value.error_code == PfError.P | PfError.RSVD
    # PSE-36: PDE bits 20:13 are physical address bits 39:32.
    mem.write_u32(0x1000 + 0x303 * 4, 0x80_0000 | (1 << 13) | P | RW | PS)
    assert mem.translate((0x303 << 22) + 9, 0x1000, access=SUP_READ, maxphyaddr=40, **kw) == (1 << 32) + 0x80_0009
    with pytest.raises(PageFault):
        mem.translate(0x303 << 22, 0x1000, access=SUP_READ, maxphyaddr=32, **kw)


def test_pae_paging_checks_nx_and_us(mem):
    cr0, cr4 = CR0_PE | CR0_PG | CR0_WP, CR4_PAE
    mem.write_u64(0x1020 + 2 * 8, 0x2000 | P)
    mem.write_u64(0x2000 + 3 * 8, 0x3000 | P | RW | US)
    mem.write_u64(0x3000 + 5 * 8, 0x12_3000 | P | RW | XD)
    gva = (2 << 30) + (3 << 21) + (5 << 12) + 0x77
    kw = dict(cr0=cr0, cr4=cr4, efer=EFER_NXE)
    assert mem.translate(gva, 0x1020, access=SUP_WRITE, **kw) == 0x12_3077
    for access, code in ((SUP_FETCH, PfError.P | PfError.ID), (USER_READ, PfError.P | PfError.U)):
        with pytest.raises(PageFault) as e:
            mem.translate(gva, 0x1020, access=access, **kw)
        assert e.value.error_code == code


def test_access_of_cpu_follows_cpl_ac_and_implicit_accesses():
    assert Access.of_cpu(3, write=True) == USER_WRITE
    assert Access.of_cpu(0, 1 << 18) == Access(ac=True)
    assert Access.of_cpu(3, implicit=True) == Access(implicit=True)  # a GDT read at CPL3 is supervisor


# -- the completion paths (kvmpy/assists.py, kvmpy/x86/emulate.py) ------------------------

def _sregs(*, cpl: int = 0, cr4: int = CR4_PAE, cr0: int = CR0_PE | CR0_PG | CR0_WP):
    s = ffi.new("struct kvm_sregs *")
    s.cr0, s.cr3, s.cr4, s.efer = cr0, PML4, cr4, EFER_LMA | EFER_NXE | (1 << 8)
    s.cs.dpl = cpl
    return s


def test_a_completed_store_to_a_read_only_page_faults_and_writes_nothing(mem):
    _map(mem, PAGE | P | US)
    mem.fill(PAGE, 4096, 0xAA)
    fault = Assists(mem).store(None, _sregs(), GVA + 0x10, b"\x55" * 16, Access(write=True))
    assert fault == Fault(14, PfError.P | PfError.W, GVA + 0x10)
    assert mem.read(PAGE + 0x10, 16) == b"\xAA" * 16


def test_a_completed_store_across_pages_checks_both_before_writing(mem):
    _map(mem, PAGE | P | RW | US)
    _map(mem, (PAGE + 0x1000) | P | US, gva=GVA + 0x1000)  # the next page is read-only
    mem.fill(PAGE, 0x2000, 0)
    fault = Assists(mem).store(None, _sregs(cpl=3), GVA + 0xFF8, b"\x11" * 16, Access(user=True, write=True))
    assert fault == Fault(14, PfError.P | PfError.W | PfError.U, GVA + 0x1000)
    assert mem.read(PAGE + 0xFF8, 8) == bytes(8)


def test_a_completed_load_from_a_user_page_with_smap_faults(mem):
    _map(mem, PAGE | P | RW | US)
    mem.write(PAGE, b"secret!!")
    a = Assists(mem)
    assert a.load(None, _sregs(cr4=CR4_PAE | CR4_SMAP), GVA, 8, Access()) == Fault(14, PfError.P, GVA)
    assert a.load(None, _sregs(cr4=CR4_PAE | CR4_SMAP), GVA, 8, Access(ac=True)) == b"secret!!"


def test_unicorn_fault_error_code_comes_from_the_permission_walk(mem):
    _map(mem, PAGE | P | US)  # user, read-only
    s = _sregs(cpl=3)
    assert page_fault_error_code(mem, GVA, s, write=True) == PfError.P | PfError.W | PfError.U
    assert page_fault_error_code(mem, GVA, _sregs(cr4=CR4_PAE | CR4_SMAP), write=False) == PfError.P
    assert page_fault_error_code(mem, GVA, _sregs(), write=False, rflags=1 << 18) == PfError.P  # modelled: no fault
    _map(mem, PAGE | P | RW | US | XD)
    assert page_fault_error_code(mem, GVA, s, write=False, fetch=True) == PfError.P | PfError.U | PfError.ID
