"""kvmpy.x86.arch: the x86 vocabulary (bits, vectors, CPU mode), without /dev/kvm."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvmpy import arch
from kvmpy._kvm import ffi
from kvmpy.x86.arch import ERROR_CODE_VECTORS, CpuMode, Cr0, Cr4, Efer, Rflags, Vector, cpl, cpu_mode

# Intel SDM vol. 3A, table 6-1 ("Error Code" column), and AMD APM vol. 2, table 8-1 for
# the AMD-only vectors 28-30: written out per vector, independently of arch.py's set.
SDM_TABLE_6_1 = {
    0: ("DE", False), 1: ("DB", False), 2: ("NMI", False), 3: ("BP", False), 4: ("OF", False),
    5: ("BR", False), 6: ("UD", False), 7: ("NM", False), 8: ("DF", True), 10: ("TS", True),
    11: ("NP", True), 12: ("SS", True), 13: ("GP", True), 14: ("PF", True), 16: ("MF", False),
    17: ("AC", True), 18: ("MC", False), 19: ("XM", False), 20: ("VE", False), 21: ("CP", True),
    28: ("HV", False), 29: ("VC", True), 30: ("SX", True),
}


@pytest.mark.parametrize("number", sorted(SDM_TABLE_6_1))
def test_each_vector_knows_whether_the_cpu_pushes_an_error_code(number):
    name, pushes = SDM_TABLE_6_1[number]
    assert Vector[name] == number
    assert Vector(number).has_error_code is pushes
    assert (number in ERROR_CODE_VECTORS) is pushes


def test_the_vector_enum_has_exactly_the_architectural_exceptions():
    assert {v.value for v in Vector} == set(SDM_TABLE_6_1)


def test_reserved_and_external_vectors_push_no_error_code():
    # 9 (coprocessor segment overrun, reserved since the 486), 15, 31 and external interrupts.
    assert not {9, 15, 22, 27, 31, 32, 0x80, 255} & ERROR_CODE_VECTORS


@pytest.mark.parametrize(("flag", "bit"), [
    (Cr0.PE, 0), (Cr0.MP, 1), (Cr0.EM, 2), (Cr0.TS, 3), (Cr0.ET, 4), (Cr0.NE, 5), (Cr0.WP, 16),
    (Cr0.AM, 18), (Cr0.NW, 29), (Cr0.CD, 30), (Cr0.PG, 31),
    (Cr4.VME, 0), (Cr4.PVI, 1), (Cr4.TSD, 2), (Cr4.DE, 3), (Cr4.PSE, 4), (Cr4.PAE, 5), (Cr4.MCE, 6),
    (Cr4.PGE, 7), (Cr4.PCE, 8), (Cr4.OSFXSR, 9), (Cr4.OSXMMEXCPT, 10), (Cr4.UMIP, 11), (Cr4.LA57, 12),
    (Cr4.VMXE, 13), (Cr4.SMXE, 14), (Cr4.FSGSBASE, 16), (Cr4.PCIDE, 17), (Cr4.OSXSAVE, 18),
    (Cr4.SMEP, 20), (Cr4.SMAP, 21), (Cr4.PKE, 22), (Cr4.CET, 23), (Cr4.PKS, 24),
    (Efer.SCE, 0), (Efer.LME, 8), (Efer.LMA, 10), (Efer.NXE, 11), (Efer.SVME, 12), (Efer.FFXSR, 14),
    (Rflags.CF, 0), (Rflags.FIXED, 1), (Rflags.PF, 2), (Rflags.AF, 4), (Rflags.ZF, 6), (Rflags.SF, 7),
    (Rflags.TF, 8), (Rflags.IF, 9), (Rflags.DF, 10), (Rflags.OF, 11), (Rflags.NT, 14), (Rflags.RF, 16),
    (Rflags.VM, 17), (Rflags.AC, 18), (Rflags.VIF, 19), (Rflags.VIP, 20), (Rflags.ID, 21),
])
def test_register_bits_are_at_their_sdm_positions(flag, bit):
    assert flag == 1 << bit


def test_iopl_is_the_two_bit_field_at_bits_12_13():
    assert Rflags.IOPL == 0x3000 and (0x2202 & Rflags.IOPL) >> 12 == 2


def test_bit_arithmetic_gives_plain_ints_with_twos_complement_inversion():
    # The values go into kvm_sregs fields and masks: ~ must clear one bit of a 64-bit value.
    cr0 = 0x8005_0033
    assert cr0 & ~Cr0.TS == 0x8005_0033 & ~8 and type(cr0 & Cr0.PG) is int
    assert type(Cr0.PE | Cr0.PG) is int and Cr0.PE | Cr0.PG == 0x8000_0001
    assert (1 << 63 | 0x202) & ~Rflags.IF == 1 << 63 | 2


def test_a_register_value_names_its_bits():
    assert repr(Cr0(0x8000_0011)) == "<Cr0.PE|ET|PG: 2147483665>"
    assert Cr0.WP not in Cr0(0x8000_0011)


def test_flags_are_accepted_by_kvm_structures():
    s = ffi.new("struct kvm_sregs *")
    s.cr0, s.efer = Cr0.PE | Cr0.PG, Efer.LME | Efer.LMA
    assert (s.cr0, s.efer) == (0x8000_0001, 0x500)


def _sregs(*, cr0: int = Cr0.PE, efer: int = 0, l: int = 0, db: int = 0, dpl: int = 0) -> SimpleNamespace:
    return SimpleNamespace(cr0=cr0, efer=efer, cs=SimpleNamespace(l=l, db=db, dpl=dpl))


@pytest.mark.parametrize(("sregs", "rflags", "mode", "bits"), [
    (_sregs(cr0=Cr0.ET), None, CpuMode.REAL, 16),
    (_sregs(cr0=Cr0.ET, db=1), None, CpuMode.REAL, 16),  # CR0.PE decides, not a leftover CS.D
    (_sregs(cr0=0, efer=Efer.LME), None, CpuMode.REAL, 16),  # LME alone: long mode not active
    (_sregs(), None, CpuMode.PROTECTED16, 16),
    (_sregs(db=1), None, CpuMode.PROTECTED32, 32),
    (_sregs(cr0=Cr0.PE | Cr0.PG, db=1), Rflags.FIXED, CpuMode.PROTECTED32, 32),
    (_sregs(), Rflags.FIXED | Rflags.VM, CpuMode.VM86, 16),
    (_sregs(), Rflags.VM, CpuMode.VM86, 16),
    (_sregs(cr0=Cr0.PE | Cr0.PG, efer=Efer.LME | Efer.LMA), None, CpuMode.COMPAT16, 16),
    (_sregs(cr0=Cr0.PE | Cr0.PG, efer=Efer.LME | Efer.LMA, db=1), None, CpuMode.COMPAT32, 32),
    (_sregs(cr0=Cr0.PE | Cr0.PG, efer=Efer.LME | Efer.LMA, l=1), None, CpuMode.LONG64, 64),
    # RFLAGS.VM is ignored in IA-32e mode (the CPU cannot enter vm86 there).
    (_sregs(cr0=Cr0.PE | Cr0.PG, efer=Efer.LME | Efer.LMA, l=1), Rflags.VM, CpuMode.LONG64, 64),
    # CS.L = 1 with CS.D = 1 is reserved; CS.L decides.
    (_sregs(cr0=Cr0.PE | Cr0.PG, efer=Efer.LMA, l=1, db=1), None, CpuMode.LONG64, 64),
])
def test_cpu_mode_from_control_registers_and_cs(sregs, rflags, mode, bits):
    assert cpu_mode(sregs, rflags) is mode
    assert mode.bits == bits
    assert mode.ia32e is (mode in (CpuMode.COMPAT16, CpuMode.COMPAT32, CpuMode.LONG64))


def test_cpu_mode_reads_a_real_kvm_sregs_structure():
    s = ffi.new("struct kvm_sregs *")
    s.cr0, s.efer, s.cs.l, s.cs.db = Cr0.PE | Cr0.PG, Efer.LME | Efer.LMA, 1, 0
    assert cpu_mode(s) == "long64"  # the value is what GuestError.mode shows


def test_cpl_is_cs_dpl_in_protected_mode_and_0_in_real_mode():
    assert cpl(_sregs(dpl=3)) == 3
    assert cpl(_sregs(cr0=0, dpl=3)) == 0


def test_the_x86_import_path_is_the_same_vocabulary():
    from kvmpy.x86 import arch as x86_arch

    assert (x86_arch.Cr0, x86_arch.Vector, x86_arch.cpu_mode) == (arch.Cr0, arch.Vector, arch.cpu_mode)


def test_arch_imports_nothing_from_kvmpy():
    # memory.py (the fd layer) imports it: an import from kvmpy here could be an upward one.
    tree = ast.parse(Path(arch.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("kvmpy") or not m or m.startswith(".")]
    assert all(isinstance(n, ast.Import) or n.level == 0 for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))


_VOCABULARY = re.compile(r"^_?(CR0|CR4|EFER|RFLAGS|X86_EFLAGS)_[A-Z0-9_]+$|^_?[A-Z]{2,3}_VECTOR$|ERROR_CODE_VECTORS$")


def _literal_int(node: ast.AST) -> bool:
    """An expression made of integer literals only (e.g. `1 << 31`, `frozenset({8, 10})` is not)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, int)
    if isinstance(node, ast.BinOp):
        return _literal_int(node.left) and _literal_int(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "frozenset":
        return True
    return False


def test_no_module_writes_its_own_control_register_bits_or_vectors():
    package = Path(arch.__file__).parent  # kvmpy/
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "arch.py" and path.parent.name in ("x86", "kvmpy"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and _literal_int(node.value):
                for target in node.targets:
                    if isinstance(target, ast.Name) and _VOCABULARY.match(target.id):
                        offenders.append(f"{path.relative_to(package)}:{node.lineno} {target.id}")
    assert not offenders, "define these in kvmpy/arch.py and import them: " + ", ".join(offenders)
