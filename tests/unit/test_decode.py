"""The completion layer's decoder and its Unicorn executor, without /dev/kvm.

The executor tests run single instructions in Unicorn over a GuestMemory
(long mode, identity-mapped) and compare with the same instruction run
natively on this CPU (tests/native.py), over random register values.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.memory import GuestMemory
from kvmpy.x86 import modes
from kvmpy.x86.decode import Decoder, effective_address, read_register, write_register
from kvmpy.x86.emulate import UnicornExecutor, page_fault_error_code
from native import ARITH_FLAGS, NativeRunner, defined

u64 = st.integers(min_value=0, max_value=2**64 - 1)


@pytest.fixture(scope="module")
def decoder():
    return Decoder()


def test_decodes_length_mnemonic_and_memory_operand(decoder):
    insn = decoder.decode(bytes.fromhex("f0480fc70c2500600000") + b"\x90" * 5, 64)
    assert (insn.mnemonic, insn.length, insn.base_mnemonic) == ("lock cmpxchg16b", 10, "cmpxchg16b")
    (m,) = insn.mems
    assert (m.base, m.index, m.disp, m.size) == (None, None, 0x6000, 16)
    assert insn.writes_memory and not insn.touches_fpu


def test_decodes_in_16_32_and_64_bit_modes(decoder):
    assert decoder.decode(bytes.fromhex("f30fb8c3"), 32).text == "popcnt eax, ebx"
    assert decoder.decode(bytes.fromhex("f30fb8c3"), 16).text == "popcnt ax, bx"
    assert decoder.decode(bytes.fromhex("f3480fb8c3"), 64).text == "popcnt rax, rbx"


def test_int_n_has_its_vector_as_immediate(decoder):
    insn = decoder.decode(b"\xcd\x20", 64)
    assert (insn.base_mnemonic, insn.imms, insn.length) == ("int", (0x20,), 2)
    assert decoder.decode(b"\xcc", 64).base_mnemonic == "int3"


def test_rdpru_is_known_though_capstone_cannot_decode_it(decoder):
    insn = decoder.decode(b"\x0f\x01\xfd\x90", 64)
    assert (insn.mnemonic, insn.length) == ("rdpru", 3)


def test_undecodable_bytes_give_none(decoder):
    assert decoder.decode(b"\x0f\xff", 64) is None or decoder.decode(b"\x0f\xff", 64).length == 2
    assert decoder.decode(b"", 64) is None


def test_sse_instruction_touches_fpu_state(decoder):
    assert decoder.decode(bytes.fromhex("660ffec8"), 64).touches_fpu  # paddd
    assert decoder.decode(bytes.fromhex("0fae142500600000"), 64).touches_fpu  # ldmxcsr
    assert decoder.decode(b"\x9b", 64).touches_fpu  # fwait


def test_decode_cache_hits_on_the_same_bytes():
    d = Decoder()
    a = d.decode(bytes.fromhex("f3480fb8c3"), 64)
    b = d.decode(bytes.fromhex("f3480fb8c3"), 64)
    assert a is b and (d.hits, d.misses) == (1, 1)


def _regs(**values):
    base = {n: 0 for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "rip", "rflags")}
    base.update({f"r{i}": 0 for i in range(8, 16)})
    base.update(values)
    return SimpleNamespace(**base)


def _sregs(fs_base=0, ds_base=0):
    seg = lambda base=0: SimpleNamespace(base=base)  # noqa: E731
    return SimpleNamespace(cs=seg(), ds=seg(ds_base), es=seg(), ss=seg(), fs=seg(fs_base), gs=seg())


def test_register_views_read_and_merge_like_the_cpu():
    r = _regs(rax=0x1122_3344_5566_7788)
    assert read_register(r, "ah") == 0x77 and read_register(r, "eax") == 0x5566_7788
    write_register(r, "al", 0xFF)
    assert r.rax == 0x1122_3344_5566_77FF
    write_register(r, "eax", 1)  # 32-bit writes zero-extend
    assert r.rax == 1


def test_effective_address_base_index_scale_disp_and_rip_relative(decoder):
    insn = decoder.decode(bytes.fromhex("f3480fb84c9810"), 64)  # popcnt rcx, [rax+rbx*4+0x10]
    assert effective_address(insn, insn.mems[0], _regs(rax=0x1000, rbx=2), _sregs()) == 0x1018
    rel = decoder.decode(bytes.fromhex("f3480fb80d00010000"), 64)  # popcnt rcx, [rip+0x100]
    assert effective_address(rel, rel.mems[0], _regs(rip=0x5000), _sregs()) == 0x5000 + 9 + 0x100


def test_effective_address_adds_fs_base_in_64_bit_mode_but_not_ds(decoder):
    insn = decoder.decode(bytes.fromhex("64f3480fb80c2508000000"), 64)  # popcnt rcx, fs:[8]
    assert effective_address(insn, insn.mems[0], _regs(), _sregs(fs_base=0x7000)) == 0x7008
    plain = decoder.decode(bytes.fromhex("f3480fb80c2508000000"), 64)
    assert effective_address(plain, plain.mems[0], _regs(), _sregs(ds_base=0x7000)) == 8


def test_effective_address_uses_the_segment_base_in_32_bit_mode(decoder):
    insn = decoder.decode(bytes.fromhex("f30fb808"), 32)  # popcnt ecx, [eax]
    assert effective_address(insn, insn.mems[0], _regs(rax=0x10), _sregs(ds_base=0x1000)) == 0x1010


# -- Unicorn over a GuestMemory, against the host CPU ----------------------------------

CODE_GPA = 0x10000
BUF_GPA = 0x8800


class _FakeVcpu:
    """What UnicornExecutor needs of a vCPU: set_regs/get_fpu/set_fpu record the result."""

    def __init__(self) -> None:
        self.regs = None

    def set_regs(self, regs):
        self.regs = regs

    def set_sregs(self, sregs):
        self.sregs = sregs

    def get_fpu(self):
        from kvmpy._kvm import ffi
        fpu = ffi.new("struct kvm_fpu *")
        fpu.fcw, fpu.mxcsr = 0x37F, 0x1F80
        return fpu

    def set_fpu(self, fpu):
        self.fpu = fpu


def _long_mode_sregs():
    from kvmpy._kvm import ffi
    s = ffi.new("struct kvm_sregs *")
    s.cr0 = modes.CR0_PE | modes.CR0_PG | modes.CR0_ET | modes.CR0_NE | modes.CR0_WP
    s.cr4 = modes.CR4_PAE | modes.CR4_OSFXSR | modes.CR4_OSXMMEXCPT
    s.efer = modes.EFER_LME | modes.EFER_LMA
    s.cr3 = modes.PML4_ADDR
    s.gdt.base, s.gdt.limit = modes.GDT_ADDR, 0x4F
    modes.CODE64.load(s.cs)
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        modes.DATA.load(seg)
    return s


@pytest.fixture(scope="module")
def machine():
    mem = GuestMemory(4 << 20)
    modes.write_gdt(mem, long_mode=True)
    modes.write_identity_page_tables(mem)
    ex = UnicornExecutor(mem)
    yield mem, ex
    ex.close()
    mem.close()


def _run_unicorn(machine, body: str, values: dict, memory: bytes):
    from kvmpy._kvm import ffi
    from kvmpy.x86.asm import assemble
    mem, ex = machine
    code = assemble(body, "64", CODE_GPA)
    mem.write(CODE_GPA, code)
    mem.write(BUF_GPA, memory)
    insn = Decoder().decode(code[:15], 64)
    regs = ffi.new("struct kvm_regs *")
    for k, v in values.items():
        setattr(regs, k, v)
    regs.rsi, regs.rip, regs.rsp, regs.rflags = BUF_GPA, CODE_GPA, 0x7000, 2 | values.get("rflags", 0)
    vcpu = _FakeVcpu()
    assert ex.execute(vcpu, regs, _long_mode_sregs(), insn) is None
    out = {n: getattr(vcpu.regs, n) for n in ("rax", "rbx", "rcx", "rdx")}
    out["rflags"] = vcpu.regs.rflags & ARITH_FLAGS
    assert vcpu.regs.rip == CODE_GPA + insn.length
    return out, mem.read(BUF_GPA, 64)


MEMORY = bytes(range(64))


@settings(max_examples=60, deadline=None)
@given(rax=u64, rbx=u64, rcx=u64, rdx=u64, flags=st.integers(0, ARITH_FLAGS).map(lambda f: f & ARITH_FLAGS),
       body=st.sampled_from(["popcnt %rbx, %rax", "popcnt (%rsi), %eax", "movbe 8(%rsi), %rax",
                             "movbe %rbx, 16(%rsi)", "movbe 4(%rsi), %cx", "crc32q %rbx, %rax",
                             "andn %rbx, %rcx, %rax", "pdep %rbx, %rcx, %rax", "pext %rbx, %rcx, %rax",
                             "adox %rbx, %rax", "lzcnt %rbx, %rax", "bextr %rcx, %rbx, %rax"]))
def test_property_unicorn_matches_native(machine, rax, rbx, rcx, rdx, flags, body):
    values = {"rax": rax, "rbx": rbx, "rcx": rcx, "rdx": rdx, "rflags": flags}
    got, got_mem = _run_unicorn(machine, body, values, MEMORY)
    want, want_mem = NativeRunner(body).run(values, MEMORY)
    assert defined(got, body) == defined({k: want[k] for k in got}, body) and got_mem == want_mem


@settings(max_examples=40, deadline=None)
@given(lo=u64, hi=u64, rbx=u64, rcx=u64, equal=st.booleans())
def test_property_unicorn_cmpxchg16b_matches_native(machine, lo, hi, rbx, rcx, equal):
    memory = lo.to_bytes(8, "little") + hi.to_bytes(8, "little") + MEMORY[16:]
    values = {"rax": lo if equal else lo ^ 1, "rdx": hi, "rbx": rbx, "rcx": rcx}
    body = "lock cmpxchg16b (%rsi)"
    got, got_mem = _run_unicorn(machine, body, values, memory)
    want, want_mem = NativeRunner(body).run(values, memory)
    assert got == {k: want[k] for k in got} and got_mem == want_mem


def test_unicorn_fault_on_an_unmapped_operand_returns_page_fault_with_cr2(machine):
    from kvmpy._kvm import ffi
    from kvmpy.x86.asm import assemble
    mem, ex = machine
    code = assemble("popcnt (%rbx), %rax", "64", CODE_GPA)
    mem.write(CODE_GPA, code)
    regs = ffi.new("struct kvm_regs *")
    regs.rip, regs.rflags, regs.rbx = CODE_GPA, 2, 0x8_0000_0000  # beyond the 4 GiB identity map
    fault = ex.execute(_FakeVcpu(), regs, _long_mode_sregs(), Decoder().decode(code[:15], 64))
    assert (fault.vector, fault.error_code, fault.cr2) == (14, 0, 0x8_0000_0000)


def test_page_fault_error_code_bits(machine):
    mem, _ = machine
    s = _long_mode_sregs()
    assert page_fault_error_code(mem, 0x1000, s, write=True) == 0x3  # present, write
    assert page_fault_error_code(mem, 1 << 40, s, write=False) == 0x0
