"""Typed exit records decoded from a vCPU's `struct kvm_run`.

`decode(run, page)` turns the exit KVM wrote into one small object per exit
reason (KVM API document, section 5, "The kvm_run structure"). Records that
the VMM must answer (port input, MMIO reads, RDMSR) carry a writable view
into the kvm_run page and a method that completes them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._kvm import ffi, lib

_SKIP = ("KVM_EXIT_IO_", "KVM_EXIT_HYPERV_", "KVM_EXIT_XEN_")
ExitReason = enum.IntEnum(  # type: ignore[misc]
    "ExitReason",
    sorted(((n[len("KVM_EXIT_"):], getattr(lib, n)) for n in dir(lib)
            if n.startswith("KVM_EXIT_") and not n.startswith(_SKIP)), key=lambda kv: kv[1]),
)
ExitReason.__doc__ = "KVM_EXIT_* exit reasons, values from <linux/kvm.h>."


class SystemEvent(enum.IntEnum):
    SHUTDOWN = lib.KVM_SYSTEM_EVENT_SHUTDOWN
    RESET = lib.KVM_SYSTEM_EVENT_RESET
    CRASH = lib.KVM_SYSTEM_EVENT_CRASH
    WAKEUP = lib.KVM_SYSTEM_EVENT_WAKEUP
    SUSPEND = lib.KVM_SYSTEM_EVENT_SUSPEND
    SEV_TERM = lib.KVM_SYSTEM_EVENT_SEV_TERM


class InternalError(enum.IntEnum):
    EMULATION = lib.KVM_INTERNAL_ERROR_EMULATION
    SIMUL_EX = lib.KVM_INTERNAL_ERROR_SIMUL_EX
    DELIVERY_EV = lib.KVM_INTERNAL_ERROR_DELIVERY_EV
    UNEXPECTED_EXIT_REASON = lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON


@dataclass(slots=True)
class Exit:
    """Base of all exit records; `reason` is the KVM_EXIT_* value.

    `handled_as` is set by the handler that consumed the exit when KVM's
    reason does not say what it was ("syscall trap", "completion of int3"
    for KVM_EXIT_INTERNAL_ERROR); the exit accounting books it so.
    """

    reason: int
    handled_as: str | None = field(default=None, kw_only=True)

    @property
    def name(self) -> str:
        try:
            return ExitReason(self.reason).name
        except ValueError:
            return f"EXIT_{self.reason}"


@dataclass(slots=True)
class IoExit(Exit):
    """KVM_EXIT_IO: `in`/`out` (or string I/O: `count` > 1) on `port`."""

    port: int
    size: int
    count: int
    is_write: bool
    data: memoryview  # size * count bytes inside the kvm_run page

    def values(self) -> list[int]:
        """The values written by an `out` (one per repetition)."""
        s = self.size
        return [int.from_bytes(self.data[i:i + s], "little") for i in range(0, s * self.count, s)]

    def complete(self, *values: int) -> None:
        """Answer an `in`: one value per repetition."""
        s = self.size
        for i, v in enumerate(values):
            self.data[i * s:(i + 1) * s] = (v & ((1 << (8 * s)) - 1)).to_bytes(s, "little")


@dataclass(slots=True)
class MmioExit(Exit):
    """KVM_EXIT_MMIO: a guest access to a GPA that is not in any memory slot."""

    address: int
    size: int
    is_write: bool
    data: Any  # cffi buffer over run->mmio.data[8]

    @property
    def value(self) -> int:
        return int.from_bytes(self.data[0:self.size], "little")

    def complete(self, value: int) -> None:
        """Answer an MMIO read."""
        self.data[0:self.size] = (value & ((1 << (8 * self.size)) - 1)).to_bytes(self.size, "little")


@dataclass(slots=True)
class HltExit(Exit):
    """KVM_EXIT_HLT: `hlt` with no in-kernel LAPIC to wait in."""


@dataclass(slots=True)
class ShutdownExit(Exit):
    """KVM_EXIT_SHUTDOWN: a triple fault (the CPU would reset)."""


@dataclass(slots=True)
class FailEntryExit(Exit):
    """KVM_EXIT_FAIL_ENTRY: VM entry failed (invalid guest state for VT-x/SVM)."""

    hardware_entry_failure_reason: int
    cpu: int


@dataclass(slots=True)
class InternalErrorExit(Exit):
    """KVM_EXIT_INTERNAL_ERROR; for emulation failures, the instruction bytes if KVM gave them."""

    suberror: int
    data: tuple[int, ...]
    insn_bytes: bytes

    @property
    def is_emulation_failure(self) -> bool:
        return self.suberror == InternalError.EMULATION

    def describe(self) -> str:
        try:
            sub = InternalError(self.suberror).name
        except ValueError:
            sub = str(self.suberror)
        text = f"KVM internal error {sub}"
        if self.data:
            text += " data " + " ".join(f"{d:#x}" for d in self.data)
        return text


@dataclass(slots=True)
class SystemEventExit(Exit):
    """KVM_EXIT_SYSTEM_EVENT: shutdown, reset or crash requested through a PSCI/firmware path."""

    type: int
    data: tuple[int, ...]


@dataclass(slots=True)
class DebugExit(Exit):
    """KVM_EXIT_DEBUG: a guest-debug event (single step, breakpoint) set by KVM_SET_GUEST_DEBUG."""

    exception: int
    pc: int
    dr6: int
    dr7: int


@dataclass(slots=True)
class MsrExit(Exit):
    """KVM_EXIT_X86_RDMSR / X86_WRMSR: an MSR access forwarded to userspace."""

    index: int
    data: int
    msr_reason: int
    _run: Any

    @property
    def is_write(self) -> bool:
        return self.reason == lib.KVM_EXIT_X86_WRMSR

    def complete(self, value: int = 0, *, error: bool = False) -> None:
        """Answer: the value of a read, or `error=True` to inject #GP."""
        self._run.msr.data = value
        self._run.msr.error = 1 if error else 0


@dataclass(slots=True)
class ExceptionExit(Exit):
    """KVM_EXIT_EXCEPTION."""

    exception: int
    error_code: int


@dataclass(slots=True)
class HypercallExit(Exit):
    """KVM_EXIT_HYPERCALL."""

    nr: int
    args: tuple[int, ...]


@dataclass(slots=True)
class UnknownExit(Exit):
    """KVM_EXIT_UNKNOWN: a hardware exit KVM does not understand."""

    hardware_exit_reason: int


@dataclass(slots=True)
class IntrExit(Exit):
    """KVM_RUN returned EINTR (a signal, e.g. a kick) or immediate_exit was set."""


@dataclass(slots=True)
class IrqWindowOpenExit(Exit):
    """KVM_EXIT_IRQ_WINDOW_OPEN: the guest can take an interrupt now (userspace irqchip)."""


@dataclass(slots=True)
class SetTprExit(Exit):
    """KVM_EXIT_SET_TPR: no data (unused by today's KVM on x86)."""


@dataclass(slots=True)
class TprAccessExit(Exit):
    """KVM_EXIT_TPR_ACCESS: a guest access to the APIC TPR, with KVM_TPR_ACCESS_REPORTING on."""

    rip: int
    is_write: bool


@dataclass(slots=True)
class NmiExit(Exit):
    """KVM_EXIT_NMI: no data."""


@dataclass(slots=True)
class WatchdogExit(Exit):
    """KVM_EXIT_WATCHDOG (PowerPC booke): the watchdog expired; no data."""


@dataclass(slots=True)
class IoapicEoiExit(Exit):
    """KVM_EXIT_IOAPIC_EOI: the guest EOI'd a level-triggered `vector` (split irqchip)."""

    vector: int


@dataclass(slots=True)
class HypervSynic:
    """kvm_hyperv_exit.u.synic: a SynIC MSR write (KVM_EXIT_HYPERV_SYNIC)."""

    msr: int
    control: int
    evt_page: int
    msg_page: int


@dataclass(slots=True)
class HypervHcall:
    """kvm_hyperv_exit.u.hcall: a Hyper-V hypercall (KVM_EXIT_HYPERV_HCALL); userspace sets `result`."""

    input: int
    result: int
    params: tuple[int, int]


@dataclass(slots=True)
class HypervSyndbg:
    """kvm_hyperv_exit.u.syndbg: a synthetic debugger MSR access (KVM_EXIT_HYPERV_SYNDBG)."""

    msr: int
    control: int
    status: int
    send_page: int
    recv_page: int
    pending_page: int


@dataclass(slots=True)
class HypervExit(Exit):
    """KVM_EXIT_HYPERV: `type` is KVM_EXIT_HYPERV_*; `info` the decoded union member (None for a type
    this header does not know)."""

    type: int
    info: HypervSynic | HypervHcall | HypervSyndbg | None


@dataclass(slots=True)
class XenExit(Exit):
    """KVM_EXIT_XEN: `type` KVM_EXIT_XEN_HCALL is a Xen hypercall (`input`, `params`); userspace sets `result`."""

    type: int
    longmode: int
    cpl: int
    input: int
    result: int
    params: tuple[int, ...]


@dataclass(slots=True)
class DirtyRingFullExit(Exit):
    """KVM_EXIT_DIRTY_RING_FULL: the vCPU's dirty ring is full; harvest it and KVM_RESET_DIRTY_RINGS."""


@dataclass(slots=True)
class ApResetHoldExit(Exit):
    """KVM_EXIT_AP_RESET_HOLD (SEV-ES): an AP is parked waiting for a reset; no data."""


@dataclass(slots=True)
class BusLockExit(Exit):
    """KVM_EXIT_X86_BUS_LOCK: the guest took a split-lock / bus lock (KVM_CAP_X86_BUS_LOCK_EXIT); no data."""


@dataclass(slots=True)
class NotifyExit(Exit):
    """KVM_EXIT_NOTIFY: the CPU was stuck in the guest past the notify window (KVM_CAP_X86_NOTIFY_VMEXIT)."""

    flags: int

    @property
    def context_invalid(self) -> bool:
        """KVM_NOTIFY_CONTEXT_INVALID: the VM context is corrupted; the VM must not go on."""
        return bool(self.flags & lib.KVM_NOTIFY_CONTEXT_INVALID)


# Exits of other architectures: x86 KVM never returns them, but the header names them.

@dataclass(slots=True)
class S390SieicExit(Exit):
    """KVM_EXIT_S390_SIEIC: an intercepted s390 instruction."""

    icptcode: int
    ipa: int
    ipb: int


@dataclass(slots=True)
class S390ResetExit(Exit):
    """KVM_EXIT_S390_RESET: `flags` are KVM_S390_RESET_*."""

    flags: int


@dataclass(slots=True)
class S390UcontrolExit(Exit):
    """KVM_EXIT_S390_UCONTROL: a user-controlled VM's translation exception."""

    trans_exc_code: int
    pgm_code: int


@dataclass(slots=True)
class DcrExit(Exit):
    """KVM_EXIT_DCR (deprecated, PowerPC 4xx): a device control register access."""

    dcrn: int
    data: int
    is_write: bool


@dataclass(slots=True)
class OsiExit(Exit):
    """KVM_EXIT_OSI (PowerPC): an OSI hypercall with the guest's 32 GPRs."""

    gprs: tuple[int, ...]


@dataclass(slots=True)
class PaprHcallExit(Exit):
    """KVM_EXIT_PAPR_HCALL (PowerPC): a PAPR hypercall `nr` with `args`; userspace sets `ret`."""

    nr: int
    ret: int
    args: tuple[int, ...]


@dataclass(slots=True)
class S390TschExit(Exit):
    """KVM_EXIT_S390_TSCH: a TEST SUBCHANNEL for userspace."""

    subchannel_id: int
    subchannel_nr: int
    io_int_parm: int
    io_int_word: int
    ipb: int
    dequeued: bool


@dataclass(slots=True)
class EprExit(Exit):
    """KVM_EXIT_EPR (PowerPC): userspace supplies the external proxy register value."""

    epr: int


@dataclass(slots=True)
class S390StsiExit(Exit):
    """KVM_EXIT_S390_STSI: a STORE SYSTEM INFORMATION for userspace."""

    addr: int
    ar: int
    fc: int
    sel1: int
    sel2: int


@dataclass(slots=True)
class ArmNisvExit(Exit):
    """KVM_EXIT_ARM_NISV (arm64): a data abort without valid syndrome at `fault_ipa`."""

    esr_iss: int
    fault_ipa: int


@dataclass(slots=True)
class RiscvSbiExit(Exit):
    """KVM_EXIT_RISCV_SBI: an SBI call for userspace; userspace sets `ret`."""

    extension_id: int
    function_id: int
    args: tuple[int, ...]
    ret: tuple[int, int]


@dataclass(slots=True)
class RiscvCsrExit(Exit):
    """KVM_EXIT_RISCV_CSR: a CSR access for userspace; userspace sets `ret_value`."""

    csr_num: int
    new_value: int
    write_mask: int
    ret_value: int


@dataclass(slots=True)
class RawExit(Exit):
    """The documented generic record: an exit reason kvmpy has no decoder for (a reason a newer header
    added after this code was written). `union` is the 256 bytes of kvm_run's exit union, undecoded."""

    union: bytes


def decode(run: Any, page: memoryview) -> Exit:
    """Build the exit record for the exit currently in `run` (a `struct kvm_run *`).

    `page` is a memoryview of the whole kvm_run mapping (I/O data lives in it).
    Every reason in `ExitReason` has a typed record; any other gets a `RawExit`.
    """
    reason = run.exit_reason
    decoder = _DECODERS.get(reason)
    if decoder is None:
        return RawExit(reason, bytes(ffi.buffer(ffi.addressof(run.hw), _UNION_SIZE)))
    return decoder(run, page, reason)


def _decode_io(run: Any, page: memoryview, reason: int) -> IoExit:
    io = run.io
    n = io.size * io.count
    off = io.data_offset
    if off + n > len(page):
        raise ValueError(f"KVM_EXIT_IO data [{off}, {off + n}) outside the kvm_run page")
    return IoExit(reason, io.port, io.size, io.count, io.direction == lib.KVM_EXIT_IO_OUT, page[off:off + n])


def _decode_hyperv(run: Any, page: memoryview, reason: int) -> HypervExit:
    h = run.hyperv
    info: HypervSynic | HypervHcall | HypervSyndbg | None = None
    if h.type == lib.KVM_EXIT_HYPERV_SYNIC:
        u = h.u.synic
        info = HypervSynic(u.msr, u.control, u.evt_page, u.msg_page)
    elif h.type == lib.KVM_EXIT_HYPERV_HCALL:
        u = h.u.hcall
        info = HypervHcall(u.input, u.result, (u.params[0], u.params[1]))
    elif h.type == lib.KVM_EXIT_HYPERV_SYNDBG:
        u = h.u.syndbg
        info = HypervSyndbg(u.msr, u.control, u.status, u.send_page, u.recv_page, u.pending_page)
    return HypervExit(reason, h.type, info)


def _decode_xen(run: Any, page: memoryview, reason: int) -> XenExit:
    x = run.xen
    c = x.u.hcall
    return XenExit(reason, x.type, c.longmode, c.cpl, c.input, c.result, tuple(c.params))


def _plain(cls: type) -> Callable[[Any, memoryview, int], Exit]:
    return lambda run, page, reason: cls(reason)


# The exit union's size: the header pads it to 256 bytes ("Fix the size of the union").
_UNION_SIZE = ffi.offsetof("struct kvm_run", "kvm_valid_regs") - ffi.offsetof("struct kvm_run", "hw")

_DECODERS: dict[int, Callable[[Any, memoryview, int], Exit]] = {
    lib.KVM_EXIT_UNKNOWN: lambda r, p, reason: UnknownExit(reason, r.hw.hardware_exit_reason),
    lib.KVM_EXIT_EXCEPTION: lambda r, p, reason: ExceptionExit(reason, r.ex.exception, r.ex.error_code),
    lib.KVM_EXIT_IO: _decode_io,
    lib.KVM_EXIT_HYPERCALL: lambda r, p, reason: HypercallExit(reason, r.hypercall.nr, tuple(r.hypercall.args)),
    lib.KVM_EXIT_DEBUG: lambda r, p, reason: DebugExit(reason, r.debug.arch.exception, r.debug.arch.pc,
                                                       r.debug.arch.dr6, r.debug.arch.dr7),
    lib.KVM_EXIT_HLT: _plain(HltExit),
    lib.KVM_EXIT_MMIO: lambda r, p, reason: MmioExit(reason, r.mmio.phys_addr, r.mmio.len, bool(r.mmio.is_write),
                                                     ffi.buffer(r.mmio.data)),
    lib.KVM_EXIT_IRQ_WINDOW_OPEN: _plain(IrqWindowOpenExit),
    lib.KVM_EXIT_SHUTDOWN: _plain(ShutdownExit),
    lib.KVM_EXIT_FAIL_ENTRY: lambda r, p, reason: FailEntryExit(
        reason, r.fail_entry.hardware_entry_failure_reason, r.fail_entry.cpu),
    lib.KVM_EXIT_INTR: _plain(IntrExit),
    lib.KVM_EXIT_SET_TPR: _plain(SetTprExit),
    lib.KVM_EXIT_TPR_ACCESS: lambda r, p, reason: TprAccessExit(reason, r.tpr_access.rip,
                                                                bool(r.tpr_access.is_write)),
    lib.KVM_EXIT_S390_SIEIC: lambda r, p, reason: S390SieicExit(reason, r.s390_sieic.icptcode, r.s390_sieic.ipa,
                                                                r.s390_sieic.ipb),
    lib.KVM_EXIT_S390_RESET: lambda r, p, reason: S390ResetExit(reason, r.s390_reset_flags),
    lib.KVM_EXIT_DCR: lambda r, p, reason: DcrExit(reason, r.dcr.dcrn, r.dcr.data, bool(r.dcr.is_write)),
    lib.KVM_EXIT_NMI: _plain(NmiExit),
    lib.KVM_EXIT_INTERNAL_ERROR: lambda r, p, reason: _decode_internal(r, reason),
    lib.KVM_EXIT_OSI: lambda r, p, reason: OsiExit(reason, tuple(r.osi.gprs)),
    lib.KVM_EXIT_PAPR_HCALL: lambda r, p, reason: PaprHcallExit(reason, r.papr_hcall.nr, r.papr_hcall.ret,
                                                                tuple(r.papr_hcall.args)),
    lib.KVM_EXIT_S390_UCONTROL: lambda r, p, reason: S390UcontrolExit(reason, r.s390_ucontrol.trans_exc_code,
                                                                      r.s390_ucontrol.pgm_code),
    lib.KVM_EXIT_WATCHDOG: _plain(WatchdogExit),
    lib.KVM_EXIT_S390_TSCH: lambda r, p, reason: S390TschExit(
        reason, r.s390_tsch.subchannel_id, r.s390_tsch.subchannel_nr, r.s390_tsch.io_int_parm,
        r.s390_tsch.io_int_word, r.s390_tsch.ipb, bool(r.s390_tsch.dequeued)),
    lib.KVM_EXIT_EPR: lambda r, p, reason: EprExit(reason, r.epr.epr),
    lib.KVM_EXIT_SYSTEM_EVENT: lambda r, p, reason: SystemEventExit(
        reason, r.system_event.type, tuple(r.system_event.data[0:min(r.system_event.ndata, 16)])),
    lib.KVM_EXIT_S390_STSI: lambda r, p, reason: S390StsiExit(reason, r.s390_stsi.addr, r.s390_stsi.ar,
                                                              r.s390_stsi.fc, r.s390_stsi.sel1, r.s390_stsi.sel2),
    lib.KVM_EXIT_IOAPIC_EOI: lambda r, p, reason: IoapicEoiExit(reason, r.eoi.vector),
    lib.KVM_EXIT_HYPERV: _decode_hyperv,
    lib.KVM_EXIT_ARM_NISV: lambda r, p, reason: ArmNisvExit(reason, r.arm_nisv.esr_iss, r.arm_nisv.fault_ipa),
    lib.KVM_EXIT_X86_RDMSR: lambda r, p, reason: MsrExit(reason, r.msr.index, r.msr.data, r.msr.reason, r),
    lib.KVM_EXIT_X86_WRMSR: lambda r, p, reason: MsrExit(reason, r.msr.index, r.msr.data, r.msr.reason, r),
    lib.KVM_EXIT_DIRTY_RING_FULL: _plain(DirtyRingFullExit),
    lib.KVM_EXIT_AP_RESET_HOLD: _plain(ApResetHoldExit),
    lib.KVM_EXIT_X86_BUS_LOCK: _plain(BusLockExit),
    lib.KVM_EXIT_XEN: _decode_xen,
    lib.KVM_EXIT_RISCV_SBI: lambda r, p, reason: RiscvSbiExit(
        reason, r.riscv_sbi.extension_id, r.riscv_sbi.function_id, tuple(r.riscv_sbi.args),
        (r.riscv_sbi.ret[0], r.riscv_sbi.ret[1])),
    lib.KVM_EXIT_RISCV_CSR: lambda r, p, reason: RiscvCsrExit(
        reason, r.riscv_csr.csr_num, r.riscv_csr.new_value, r.riscv_csr.write_mask, r.riscv_csr.ret_value),
    lib.KVM_EXIT_NOTIFY: lambda r, p, reason: NotifyExit(reason, r.notify.flags),
}


def _decode_internal(run: Any, reason: int) -> InternalErrorExit:
    e = run.internal
    ndata = min(e.ndata, 16)
    insn = b""
    if e.suberror == lib.KVM_INTERNAL_ERROR_EMULATION:
        ef = run.emulation_failure
        if ef.ndata >= 1 and ef.flags & lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
            insn = bytes(ef.insn_bytes[0:min(ef.insn_size, 15)])
    return InternalErrorExit(reason, e.suberror, tuple(e.data[0:ndata]), insn)
