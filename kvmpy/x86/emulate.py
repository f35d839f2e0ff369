"""Execute one guest instruction in the Unicorn CPU emulator, over the guest's own memory.

`UnicornExecutor.execute(vcpu, regs, sregs, insn)` runs the instruction at
regs.rip once and either writes the changed state back to the vCPU or
returns the `Fault` the instruction raised (vector, error code, CR2), which
the caller injects so the guest sees what the CPU would have done.

How it is set up (once per CPU mode, then reused):
- guest RAM is mapped zero-copy: `mem_map_ptr` at each region's GPA with the
  region's host address, so loads and stores hit the guest's memory;
- everything else in the physical address space below 2^40 is `mmio_map`ped
  to the device bus (an MMIO write by a completed instruction reaches the
  same device a KVM_EXIT_MMIO would), or reads as all ones without a bus;
- CR0, CR3, CR4, EFER, GDTR/IDTR and the segment selectors are copied in
  (Unicorn loads the hidden segment parts from the guest's GDT); CR3 is
  written every time, which flushes Unicorn's TLB, so page-table edits the
  guest made since the last completion are seen;
- Unicorn's translated-code cache is kept (retranslation costs ~0.7 ms);
  it is invalidated for an address when the instruction bytes there change.

Exceptions inside Unicorn go to an interrupt hook, which stops emulation and
records the vector; for #PF, CR2 comes from Unicorn and the error code is
rebuilt from the guest page tables and the access (SDM vol. 3A, 4.7).
"""

from __future__ import annotations

import ctypes
from typing import Any

import unicorn
import unicorn.x86_const as ux
from unicorn.unicorn_py3.unicorn import uclib

from ..errors import GuestMemoryError, KvmError, PageFault
from ..memory import MAX_PHYS_BITS, Access, GuestMemory, PfError
from .arch import ERROR_CODE_VECTORS, CpuMode, Cr0, Rflags, Vector, cpu_mode
from .decode import Fault, Instruction

PF_VECTOR = Vector.PF

PHYS_LIMIT = 1 << 40
_PAGE = 4096

_GPRS64 = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"] + [f"r{i}" for i in range(8, 16)]
_GPRS32 = _GPRS64[:8]
_CRS = [ux.UC_X86_REG_CR0, ux.UC_X86_REG_CR3, ux.UC_X86_REG_CR4]


def _state_ids(uc_mode: int) -> list[int]:
    """Unicorn register IDs for the GPRs, RIP and RFLAGS of a mode (no R8-R15 outside 64-bit)."""
    if uc_mode == unicorn.UC_MODE_64:
        return [getattr(ux, f"UC_X86_REG_{n.upper()}") for n in _GPRS64] + \
            [ux.UC_X86_REG_RIP, ux.UC_X86_REG_RFLAGS]
    return [getattr(ux, f"UC_X86_REG_E{n[1:].upper()}") for n in _GPRS32] + \
        [ux.UC_X86_REG_EIP, ux.UC_X86_REG_EFLAGS]
_SEGS = (("es", ux.UC_X86_REG_ES), ("ss", ux.UC_X86_REG_SS), ("ds", ux.UC_X86_REG_DS),
         ("fs", ux.UC_X86_REG_FS), ("gs", ux.UC_X86_REG_GS))
MSR_EFER = 0xC000_0080
MSR_FS_BASE = 0xC000_0100
MSR_GS_BASE = 0xC000_0101

RFLAGS_TF = Rflags.TF
_CR0_PE = Cr0.PE


class UnicornUnsupported(KvmError):
    """Unicorn cannot execute this instruction (it reports it as invalid)."""


class _RegBlock:
    """A fixed list of Unicorn registers read or written in one uc_reg_*_batch call.

    The Python binding's batch helpers build ctypes objects per call (~4 us a
    register); this keeps the arrays and does one C call.
    """

    def __init__(self, ids: list[int]) -> None:
        n = len(ids)
        self.n = n
        self.ids = (ctypes.c_int * n)(*ids)
        self.vals = (ctypes.c_uint64 * n)()
        self.ptrs = (ctypes.c_void_p * n)(*[ctypes.addressof(self.vals) + 8 * i for i in range(n)])

    def write(self, uc: unicorn.Uc, values: list[int]) -> None:
        self.vals[:] = values
        status = uclib.uc_reg_write_batch(uc._uch, self.ids, self.ptrs, self.n)  # noqa: SLF001 (unicorn has no public raw handle; the batch call needs it)
        if status != unicorn.UC_ERR_OK:
            raise unicorn.UcError(status)

    def read(self, uc: unicorn.Uc) -> list[int]:
        status = uclib.uc_reg_read_batch(uc._uch, self.ids, self.ptrs, self.n)  # noqa: SLF001 (as above)
        if status != unicorn.UC_ERR_OK:
            raise unicorn.UcError(status)
        return list(self.vals)


def host_cpu_model() -> int:
    """A Unicorn CPU model close to this host's, so the guest's CPUID (the host's here) fits."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read(4096)
    except OSError:
        text = ""
    if "AuthenticAMD" in text:
        return ux.UC_CPU_X86_EPYC_ROME
    return ux.UC_CPU_X86_ICELAKE_SERVER


class _Engine:
    """One Unicorn instance for one CPU-mode family, with what was last loaded into it."""

    def __init__(self, uc_mode: int, memory: GuestMemory, mmio_bus: Any, model: int) -> None:
        self.uc = uc = unicorn.Uc(unicorn.UC_ARCH_X86, uc_mode)
        self.uc_mode = uc_mode
        uc.ctl_set_cpu_model(model)
        self.gprs = _GPRS64 if uc_mode == unicorn.UC_MODE_64 else _GPRS32
        ids = _state_ids(uc_mode)
        self.state = _RegBlock(ids)
        self.readback = _RegBlock(ids + _CRS)
        self.loaded: dict[str, Any] = {}
        self.code_at: dict[int, bytes] = {}
        self.fault: tuple[int, int] | None = None
        self._map(memory, mmio_bus)
        uc.hook_add(unicorn.UC_HOOK_INTR, self._on_interrupt)

    def _map(self, memory: GuestMemory, bus: Any) -> None:
        uc = self.uc
        cursor = 0
        for r in sorted(memory.regions, key=lambda r: r.gpa):
            host = r.host_address
            if r.gpa > cursor:
                self._map_mmio(cursor, r.gpa - cursor, bus)
            uc.mem_map_ptr(r.gpa, r.size, unicorn.UC_PROT_ALL, host)
            cursor = r.end
        if cursor < PHYS_LIMIT:
            self._map_mmio(cursor, PHYS_LIMIT - cursor, bus)

    def _map_mmio(self, base: int, size: int, bus: Any) -> None:
        def read(uc: Any, offset: int, size: int, gpa: int) -> int:
            return bus.read(gpa + offset, size) if bus is not None else (1 << (8 * size)) - 1

        def write(uc: Any, offset: int, size: int, value: int, gpa: int) -> None:
            if bus is not None:
                bus.write(gpa + offset, size, value)

        self.uc.mmio_map(base, size, read, base, write, base)

    def _on_interrupt(self, uc: unicorn.Uc, vector: int, user_data: Any) -> None:
        cr2 = uc.reg_read(ux.UC_X86_REG_CR2) if vector == PF_VECTOR else 0
        self.fault = (vector, cr2)
        uc.emu_stop()

    def load_system_state(self, sregs: Any) -> None:
        """Control registers, descriptor tables and segments: written only when they changed."""
        uc, loaded = self.uc, self.loaded
        long_mode = self.uc_mode == unicorn.UC_MODE_64
        control = (sregs.cr0, sregs.cr4, sregs.efer if long_mode else 0)
        if loaded.get("control") != control:
            uc.reg_write(ux.UC_X86_REG_CR4, sregs.cr4)
            if long_mode:
                uc.reg_write(ux.UC_X86_REG_MSR, (MSR_EFER, sregs.efer))
            uc.reg_write(ux.UC_X86_REG_CR3, sregs.cr3)
            uc.reg_write(ux.UC_X86_REG_CR0, sregs.cr0)
            loaded["control"] = control
            loaded.pop("segments", None)
        else:
            uc.reg_write(ux.UC_X86_REG_CR3, sregs.cr3)  # also flushes Unicorn's TLB
        tables = (sregs.gdt.base, sregs.gdt.limit, sregs.idt.base, sregs.idt.limit)
        if loaded.get("tables") != tables:
            uc.reg_write(ux.UC_X86_REG_GDTR, (0, sregs.gdt.base, sregs.gdt.limit, 0))
            uc.reg_write(ux.UC_X86_REG_IDTR, (0, sregs.idt.base, sregs.idt.limit, 0))
            loaded["tables"] = tables
            loaded.pop("segments", None)
        segments = (sregs.cs.selector,) + tuple(getattr(sregs, n).selector for n, _ in _SEGS) \
            + ((sregs.fs.base, sregs.gs.base) if long_mode else ())
        if loaded.get("segments") != segments:
            uc.reg_write(ux.UC_X86_REG_CS, sregs.cs.selector)
            for name, reg in _SEGS:
                seg = getattr(sregs, name)
                if seg.unusable and sregs.cr0 & _CR0_PE:
                    uc.reg_write(reg, 0)
                else:
                    uc.reg_write(reg, seg.selector)
            if long_mode:
                uc.reg_write(ux.UC_X86_REG_MSR, (MSR_FS_BASE, sregs.fs.base))
                uc.reg_write(ux.UC_X86_REG_MSR, (MSR_GS_BASE, sregs.gs.base))
            loaded["segments"] = segments


# One engine per family: real mode, legacy protected mode, IA-32e mode.
_UC_MODES = {m: unicorn.UC_MODE_16 if m is CpuMode.REAL else unicorn.UC_MODE_64 if m.ia32e else unicorn.UC_MODE_32
             for m in CpuMode}


class UnicornExecutor:
    """Runs single guest instructions in Unicorn; one engine per CPU-mode family, kept."""

    def __init__(self, memory: GuestMemory, mmio_bus: Any = None, *, cpu_model: int | None = None) -> None:
        self.memory = memory
        self.mmio_bus = mmio_bus
        self.cpu_model = host_cpu_model() if cpu_model is None else cpu_model
        self._engines: dict[int, _Engine] = {}
        self.executed = 0
        self.maxphyaddr = MAX_PHYS_BITS  # the guest's, for the #PF error code (Assists sets it)

    def _engine(self, sregs: Any) -> _Engine:
        mode = _UC_MODES[cpu_mode(sregs)]
        engine = self._engines.get(mode)
        if engine is None:
            engine = self._engines[mode] = _Engine(mode, self.memory, self.mmio_bus, self.cpu_model)
        return engine

    def execute(self, vcpu: Any, regs: Any, sregs: Any, insn: Instruction) -> Fault | None:
        """Execute `insn` at regs.rip; on success the vCPU's registers are updated."""
        if insn.mnemonic.startswith("v") and insn.touches_fpu:
            # VEX-encoded: Unicorn 2.1 implements hardly any, and kvmpy copies no YMM upper halves.
            raise UnicornUnsupported("VEX-encoded (AVX) instructions are not executed in Unicorn")
        engine = self._engine(sregs)
        uc = engine.uc
        try:
            engine.load_system_state(sregs)
        except unicorn.UcError as e:
            raise UnicornUnsupported(f"cannot load the segment/control state into Unicorn ({e})") from e
        fpu = vcpu.get_fpu() if insn.touches_fpu else None
        # XMM8-15 exist only in 64-bit mode (Unicorn warns on every access to them elsewhere).
        xmm = _UC_XMM if engine.uc_mode == unicorn.UC_MODE_64 else _UC_XMM[:8]
        if fpu is not None:
            _load_fpu(uc, fpu, xmm)
        gprs = engine.gprs
        # Single-stepping is the caller's business (it raises the #DB trap after completing).
        engine.state.write(uc, [getattr(regs, n) for n in gprs] + [regs.rip, regs.rflags & ~RFLAGS_TF])
        linear = sregs.cs.base + regs.rip
        if engine.code_at.get(linear) != insn.code:
            if linear in engine.code_at:
                uc.ctl_remove_cache(linear, linear + insn.length)
            engine.code_at[linear] = insn.code
        begin = linear if engine.uc_mode == unicorn.UC_MODE_16 else regs.rip
        engine.fault = None
        try:
            uc.emu_start(begin, 0, 0, 1)
        except unicorn.UcError as e:
            if e.errno == unicorn.UC_ERR_INSN_INVALID:
                raise UnicornUnsupported("Unicorn does not implement it (UC_ERR_INSN_INVALID)") from e
            raise UnicornUnsupported(f"Unicorn stopped: {e}") from e
        self.executed += 1
        if engine.fault is not None:
            vector, cr2 = engine.fault
            return self._fault(vector, cr2, insn, sregs, regs.rflags)
        values = engine.readback.read(uc)
        n = len(gprs)
        if n == 8:  # 16/32-bit: Unicorn holds the low halves; the upper ones are untouched
            for name, v in zip(gprs, values):
                setattr(regs, name, (getattr(regs, name) & ~0xFFFF_FFFF) | (v & 0xFFFF_FFFF))
        else:
            for name, v in zip(gprs, values):
                setattr(regs, name, v)
        regs.rip, regs.rflags = values[n], values[n + 1] | (regs.rflags & RFLAGS_TF)
        vcpu.set_regs(regs)
        cr0, cr3, cr4 = values[n + 2:n + 5]
        if (cr0, cr3, cr4) != (sregs.cr0, sregs.cr3, sregs.cr4):
            sregs.cr0, sregs.cr3, sregs.cr4 = cr0, cr3, cr4
            vcpu.set_sregs(sregs)
        if fpu is not None:
            _store_fpu(uc, fpu, xmm)
            vcpu.set_fpu(fpu)
        return None

    def _fault(self, vector: int, cr2: int, insn: Instruction, sregs: Any, rflags: int) -> Fault:
        if vector == PF_VECTOR:
            # Unicorn gives CR2 only: the error code comes from the guest's walk for the access
            # (a read-modify-write is checked, and reported, as the write it does).
            code = page_fault_error_code(self.memory, cr2, sregs, write=insn.writes_memory, rflags=rflags,
                                         maxphyaddr=self.maxphyaddr)
            return Fault(vector, int(code), cr2)
        return Fault(vector, 0 if vector in ERROR_CODE_VECTORS else None)

    def close(self) -> None:
        """Drop the engines (each Uc closes itself when collected; never use it after the memory)."""
        self._engines.clear()


def page_fault_error_code(memory: GuestMemory, cr2: int, sregs: Any, *, write: bool,
                          fetch: bool = False, rflags: int = 0, maxphyaddr: int = MAX_PHYS_BITS) -> int:
    """The #PF error code for an access to `cr2` (SDM vol. 3A, figure 4-12).

    The guest's page walk with the access's rights (`kvmpy.memory.translate`)
    gives P, W/R, U/S (CPL 3), RSVD and I/D. If the walk allows the access,
    Unicorn faulted for a reason kvmpy does not model (protection keys): a
    protection violation (P=1) with the access bits.
    """
    cpl = sregs.cs.dpl if sregs.cr0 & _CR0_PE else 0
    access = Access.of_cpu(cpl, rflags, write=write, fetch=fetch)
    try:
        memory.translate(cr2, sregs.cr3, cr0=sregs.cr0, cr4=sregs.cr4, efer=sregs.efer, access=access,
                         maxphyaddr=maxphyaddr)
        present = PfError.P
    except PageFault as e:
        return e.error_code
    except GuestMemoryError:
        present = 0  # a paging structure outside guest RAM: nothing there
    code = present | (PfError.W if write else 0) | (PfError.U if access.user else 0)
    if fetch and (sregs.efer & (1 << 11) and sregs.cr4 & (1 << 5) or sregs.cr4 & (1 << 20)):
        code |= PfError.ID
    return int(code)


# -- x87/SSE state: struct kvm_fpu (FXSAVE layout) <-> Unicorn ---------------------------

_UC_FP = [getattr(ux, f"UC_X86_REG_FP{i}") for i in range(8)]
_UC_XMM = [getattr(ux, f"UC_X86_REG_XMM{i}") for i in range(16)]


def _load_fpu(uc: unicorn.Uc, fpu: Any, xmm: list[int]) -> None:
    for i, reg in enumerate(_UC_FP):
        raw = bytes(fpu.fpr[i][0:10])
        uc.reg_write(reg, (int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:10], "little")))
    uc.reg_write(ux.UC_X86_REG_FPCW, fpu.fcw)
    uc.reg_write(ux.UC_X86_REG_FPSW, fpu.fsw)
    # FXSAVE's abridged tag byte (1 = register in use) -> the full tag word (3 = empty).
    uc.reg_write(ux.UC_X86_REG_FPTAG, sum((0 if fpu.ftwx >> i & 1 else 3) << (2 * i) for i in range(8)))
    for i, reg in enumerate(xmm):
        uc.reg_write(reg, int.from_bytes(bytes(fpu.xmm[i][0:16]), "little"))
    uc.reg_write(ux.UC_X86_REG_MXCSR, fpu.mxcsr)


def _store_fpu(uc: unicorn.Uc, fpu: Any, xmm: list[int]) -> None:
    for i, reg in enumerate(_UC_FP):
        mantissa, exponent = uc.reg_read(reg)
        raw = mantissa.to_bytes(8, "little") + exponent.to_bytes(2, "little")
        fpu.fpr[i][0:10] = list(raw)
    fpu.fcw = uc.reg_read(ux.UC_X86_REG_FPCW)
    fpu.fsw = uc.reg_read(ux.UC_X86_REG_FPSW)
    tags = uc.reg_read(ux.UC_X86_REG_FPTAG)
    fpu.ftwx = sum(1 << i for i in range(8) if (tags >> (2 * i)) & 3 != 3)
    for i, reg in enumerate(xmm):
        fpu.xmm[i][0:16] = list(uc.reg_read(reg).to_bytes(16, "little"))
    fpu.mxcsr = uc.reg_read(ux.UC_X86_REG_MXCSR)
