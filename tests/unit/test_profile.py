"""Symbolization of exit sites (System.map, ELF symtab) and the profile's bookkeeping."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kvmpy.stats.profile import ExitProfile, Symbol, SymbolTable, merge_functions

SYSTEM_MAP = """\
0000000000000000 D __per_cpu_start
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81000100 t secondary_startup_64
ffffffff81000200 T native_io_delay
ffffffff81000280 W weak_handler
ffffffff81000300 T serial8250_tx_chars
ffffffff81000400 T _etext
ffffffff81000400 R __start_rodata
ffffffff81100000 T start_kernel
ffffffff81100800 t init_late
ffffffff81100900 T _einittext
ffffffff81200000 D some_data
"""


@pytest.fixture
def synthetic(tmp_path: Path) -> SymbolTable:
    p = tmp_path / "System.map"
    p.write_text(SYSTEM_MAP)
    return SymbolTable.from_system_map(p)


def real_kernel() -> Path:
    from kvmpy.guest.build import build_kernel
    try:
        kernel = build_kernel(progress=False)
    except Exception as e:  # no cached kernel and no way to build one here
        pytest.skip(f"guest kernel not available: {e}")
    return Path(kernel.vmlinux)


def system_map_address(path: Path, name: str) -> int:
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == name:
            return int(parts[0], 16)
    raise AssertionError(f"{name} not in {path}")


def test_synthetic_map_resolves_inside_functions(synthetic):
    assert synthetic.resolve(0xFFFFFFFF81000205) == (Symbol("native_io_delay", 0xFFFFFFFF81000200, 0), 5)
    assert synthetic.format(0xFFFFFFFF81000300) == "serial8250_tx_chars"
    assert synthetic.format(0xFFFFFFFF81000110) == "secondary_startup_64+0x10"
    assert synthetic.function(0xFFFFFFFF81000281) == "weak_handler"


def test_a_symbol_at_the_same_address_as_another_is_kept(synthetic):
    assert synthetic.function(0xFFFFFFFF81000000) in {"_text", "startup_64"}


def test_init_text_after_etext_resolves(synthetic):
    assert synthetic.format(0xFFFFFFFF81100010) == "start_kernel+0x10"
    assert synthetic.function(0xFFFFFFFF81100850) == "init_late"


def test_addresses_outside_the_text_do_not_resolve(synthetic):
    assert synthetic.resolve(0xFFFFFFFF81000500) is None  # rodata, after _etext
    assert synthetic.resolve(0xFFFFFFFF81100950) is None  # after _einittext
    assert synthetic.resolve(0xFFFFFFFF80000000) is None  # before the first symbol
    assert synthetic.format(0x401000) == "[user]"
    assert synthetic.format(0xFFFFFFFF81000500) == "[kernel, no symbol]"


def test_data_symbols_are_not_functions(synthetic):
    names = {s.name for s in synthetic.symbols}
    assert "some_data" not in names and "__per_cpu_start" not in names and "_etext" not in names


def test_real_system_map_resolves_start_kernel():
    vmlinux = real_kernel()
    smap = vmlinux.with_name("System.map")
    table = SymbolTable.for_kernel(vmlinux)
    assert table.source == str(smap)
    for name in ("start_kernel", "serial8250_tx_chars", "default_idle"):
        try:
            addr = system_map_address(smap, name)
        except AssertionError:
            continue
        assert table.format(addr + 1) == f"{name}+0x1"
    assert table.function(system_map_address(smap, "start_kernel") + 1) == "start_kernel"


def test_real_vmlinux_elf_symbols_agree_with_system_map():
    vmlinux = real_kernel()
    smap = vmlinux.with_name("System.map")
    elf = SymbolTable.from_elf(vmlinux)
    start = system_map_address(smap, "start_kernel")
    sym, off = elf.resolve(start + 0x10)
    assert sym.name == "start_kernel" and off == 0x10 and sym.size > 0x10


def test_synthetic_elf_symtab(tmp_path):
    # A minimal ELF64: null section, .text (exec), .symtab, .strtab.
    strtab = b"\0alpha\0beta\0_etext\0"
    syms = struct.pack("<IBBHQQ", 0, 0, 0, 0, 0, 0)
    syms += struct.pack("<IBBHQQ", 1, 0x12, 0, 1, 0x1000, 0x20)  # alpha: GLOBAL FUNC, 32 bytes
    syms += struct.pack("<IBBHQQ", 7, 0x12, 0, 1, 0x1040, 0x10)  # beta
    syms += struct.pack("<IBBHQQ", 12, 0x10, 0, 1, 0x1050, 0)  # _etext marker
    shoff = 64 + len(strtab) + len(syms)
    shoff += (-shoff) % 8
    sh = [struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
          struct.pack("<IIQQQQIIQQ", 0, 1, 0x6, 0x1000, 0, 0x50, 0, 0, 16, 0),
          struct.pack("<IIQQQQIIQQ", 0, 2, 0, 0, 64 + len(strtab), len(syms), 3, 1, 8, 24),
          struct.pack("<IIQQQQIIQQ", 0, 3, 0, 0, 64, len(strtab), 0, 0, 1, 0)]
    header = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x1000, 0, shoff,
                                                              0, 64, 0, 0, 64, len(sh), 0)
    body = header + strtab + syms
    body += b"\0" * (shoff - len(body)) + b"".join(sh)
    path = tmp_path / "tiny.elf"
    path.write_bytes(body)
    t = SymbolTable.from_elf(path)
    assert t.format(0x1008) == "alpha+0x8"
    assert t.resolve(0x1030) is None  # in the gap after alpha's 32 bytes
    assert t.format(0x1044) == "beta+0x4"
    assert t.resolve(0x1050) is None


def test_for_kernel_without_system_map_or_symbols_is_an_error(tmp_path):
    p = tmp_path / "vmlinux"
    p.write_bytes(b"not an elf")
    with pytest.raises(ValueError, match="not a little-endian ELF64"):
        SymbolTable.for_kernel(p)


class FakeRegs:
    def __init__(self, rip):
        self.rip = rip


class FakeRun:
    """kvm_run without synced registers."""
    kvm_valid_regs = 0


class FakeVcpu:
    def __init__(self, rips):
        self.run_struct = FakeRun()
        self.rips = list(rips)
        self.get_regs_calls = 0

    def get_regs(self):
        self.get_regs_calls += 1
        return FakeRegs(self.rips.pop(0))


def test_sampling_every_nth_exit_calls_get_regs_only_then(synthetic):
    io_delay = 0xFFFFFFFF81000204
    vcpu = FakeVcpu([io_delay] * 3)
    p = ExitProfile(vcpu, symbols=synthetic)
    assert p.every == 16  # no synced registers: sampled
    for _ in range(49):
        p.record(2, 100)
    assert vcpu.get_regs_calls == 3 and p.samples == 3 and p.source == "get_regs"
    (site,) = p.top_sites()
    assert site["symbol"] == "native_io_delay+0x4" and site["count"] == 3 and site["reasons"] == {"IO": 3}
    # The VMM time of each sampled exit arrives with the next exit.
    assert site["vmm_ns"] == 300


def test_functions_sum_their_sites(synthetic):
    rips = [0xFFFFFFFF81000301, 0xFFFFFFFF81000302, 0xFFFFFFFF81000301, 0xFFFFFFFF81000201]
    p = ExitProfile(FakeVcpu(rips), every=1, symbols=synthetic)
    for reason in (2, 2, 6, 2):
        p.record(reason, 10)
    funcs = p.top_functions()
    assert funcs[0] == {"function": "serial8250_tx_chars", "count": 3, "vmm_ns": 30,
                        "reasons": {"IO": 2, "MMIO": 1}}
    assert funcs[1]["function"] == "native_io_delay" and funcs[1]["count"] == 1
    merged = merge_functions([p.snapshot(), p.snapshot()])
    assert merged[0] == {"function": "serial8250_tx_chars", "count": 6, "vmm_ns": 60}


def test_every_must_be_positive():
    with pytest.raises(ValueError):
        ExitProfile(FakeVcpu([]), every=0)
