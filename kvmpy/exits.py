"""Typed exit records decoded from a vCPU's `struct kvm_run`.

`decode(run, page)` turns the exit KVM wrote into one small object per exit
reason (KVM API document, section 5, "The kvm_run structure"). Records that
the VMM must answer (port input, MMIO reads, RDMSR) carry a writable view
into the kvm_run page and a method that completes them.
"""

from __future__ import annotations

import enum
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


def decode(run: Any, page: memoryview) -> Exit:
    """Build the exit record for the exit currently in `run` (a `struct kvm_run *`).

    `page` is a memoryview of the whole kvm_run mapping (I/O data lives in it).
    """
    reason = run.exit_reason
    if reason == lib.KVM_EXIT_IO:
        io = run.io
        n = io.size * io.count
        off = io.data_offset
        if off + n > len(page):
            raise ValueError(f"KVM_EXIT_IO data [{off}, {off + n}) outside the kvm_run page")
        return IoExit(reason, io.port, io.size, io.count,
                      io.direction == lib.KVM_EXIT_IO_OUT, page[off:off + n])
    if reason == lib.KVM_EXIT_MMIO:
        m = run.mmio
        return MmioExit(reason, m.phys_addr, m.len, bool(m.is_write), ffi.buffer(m.data))
    if reason == lib.KVM_EXIT_HLT:
        return HltExit(reason)
    if reason == lib.KVM_EXIT_SHUTDOWN:
        return ShutdownExit(reason)
    if reason == lib.KVM_EXIT_INTR:
        return IntrExit(reason)
    if reason == lib.KVM_EXIT_INTERNAL_ERROR:
        return _decode_internal(run, reason)
    if reason == lib.KVM_EXIT_FAIL_ENTRY:
        f = run.fail_entry
        return FailEntryExit(reason, f.hardware_entry_failure_reason, f.cpu)
    if reason == lib.KVM_EXIT_SYSTEM_EVENT:
        ev = run.system_event
        return SystemEventExit(reason, ev.type, tuple(ev.data[0:min(ev.ndata, 16)]))
    if reason == lib.KVM_EXIT_DEBUG:
        a = run.debug.arch
        return DebugExit(reason, a.exception, a.pc, a.dr6, a.dr7)
    if reason in (lib.KVM_EXIT_X86_RDMSR, lib.KVM_EXIT_X86_WRMSR):
        m = run.msr
        return MsrExit(reason, m.index, m.data, m.reason, run)
    if reason == lib.KVM_EXIT_IRQ_WINDOW_OPEN:
        return IrqWindowOpenExit(reason)
    if reason == lib.KVM_EXIT_EXCEPTION:
        return ExceptionExit(reason, run.ex.exception, run.ex.error_code)
    if reason == lib.KVM_EXIT_HYPERCALL:
        h = run.hypercall
        return HypercallExit(reason, h.nr, tuple(h.args))
    if reason == lib.KVM_EXIT_UNKNOWN:
        return UnknownExit(reason, run.hw.hardware_exit_reason)
    return Exit(reason)


def _decode_internal(run: Any, reason: int) -> InternalErrorExit:
    e = run.internal
    ndata = min(e.ndata, 16)
    insn = b""
    if e.suberror == lib.KVM_INTERNAL_ERROR_EMULATION:
        ef = run.emulation_failure
        if ef.ndata >= 1 and ef.flags & lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
            insn = bytes(ef.insn_bytes[0:min(ef.insn_size, 15)])
    return InternalErrorExit(reason, e.suberror, tuple(e.data[0:ndata]), insn)
