"""`Vcpu`: a virtual CPU file descriptor and its shared `kvm_run` page.

One method per vCPU ioctl, named after it. `run()` issues KVM_RUN and
returns a typed exit record; `kick()` makes a KVM_RUN in another thread
return (immediate_exit plus a signal, as the KVM API document describes).
"""

from __future__ import annotations

import base64
import errno
import mmap
import os
import signal
import threading
from typing import Any, Iterable, Mapping

from ._ioctl import ioctl, ioctl_int
from ._kvm import ffi, lib
from .blobs import from_blob, to_blob
from .dirty import DirtyRing
from .errors import KvmError, KvmIoctlError
from .exits import Exit, IntrExit, decode

# The signal that kicks a vCPU thread out of KVM_RUN. Its handler does
# nothing; it is installed from C without SA_RESTART so KVM_RUN sees EINTR.
KICK_SIGNAL = lib.kvmpy_sigrtmin() + 4
_kick_installed = False
_kick_lock = threading.Lock()

_NEG_EINTR = -errno.EINTR
_NEG_EAGAIN = -errno.EAGAIN


def _install_kick_handler() -> None:
    global _kick_installed
    with _kick_lock:
        if not _kick_installed:
            r = lib.kvmpy_install_kick_handler(KICK_SIGNAL)
            if r < 0:
                raise KvmError(f"sigaction({KICK_SIGNAL}): {os.strerror(-r)}")
            _kick_installed = True


class MpState:
    RUNNABLE = lib.KVM_MP_STATE_RUNNABLE
    UNINITIALIZED = lib.KVM_MP_STATE_UNINITIALIZED
    INIT_RECEIVED = lib.KVM_MP_STATE_INIT_RECEIVED
    HALTED = lib.KVM_MP_STATE_HALTED
    SIPI_RECEIVED = lib.KVM_MP_STATE_SIPI_RECEIVED


class Vcpu:
    """A virtual CPU of a `Vm`."""

    def __init__(self, vm: Any, vcpu_id: int, fd: int, mmap_size: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        try:
            self._page = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(fd)
            raise KvmError(f"vcpu {vcpu_id}: cannot mmap kvm_run ({e.strerror})") from e
        self.page = memoryview(self._page)
        # The kvm_run structure KVM and the VMM share; cffi reads it in place.
        self._buffer = ffi.from_buffer(self._page)
        self.run_struct = ffi.cast("struct kvm_run *", self._buffer)
        self.thread_ident: int | None = None
        self.dirty_ring: DirtyRing | None = None
        _install_kick_handler()

    # -- running -------------------------------------------------------------

    def run_raw(self) -> int:
        """KVM_RUN; returns the exit reason (KVM_EXIT_INTR when interrupted by a kick).

        The fast path of the exit loop: no record is built.
        """
        r = lib.kvmpy_run(self.fd)
        if r < 0:
            if r == _NEG_EINTR or r == _NEG_EAGAIN:
                self.run_struct.immediate_exit = 0
                return lib.KVM_EXIT_INTR
            raise KvmIoctlError("KVM_RUN", -r, f"vcpu {self.id}")
        return self.run_struct.exit_reason

    def run_accounted(self, acct: Any) -> int:
        """`run_raw`, with the exit booked in `acct` (a `struct kvmpy_acct *` bound to this vCPU)."""
        r = lib.kvmpy_run_acct(acct)
        if r < 0:
            if r == _NEG_EINTR or r == _NEG_EAGAIN:
                self.run_struct.immediate_exit = 0
                return lib.KVM_EXIT_INTR
            raise KvmIoctlError("KVM_RUN", -r, f"vcpu {self.id}")
        return self.run_struct.exit_reason

    def run(self) -> Exit:
        """KVM_RUN once; returns the exit as a typed record."""
        self.thread_ident = threading.get_ident()
        if self.run_raw() == lib.KVM_EXIT_INTR:
            return IntrExit(lib.KVM_EXIT_INTR)
        return decode(self.run_struct, self.page)

    def decode_exit(self) -> Exit:
        """The record of the exit currently in kvm_run."""
        return decode(self.run_struct, self.page)

    def kick(self) -> None:
        """Make this vCPU's KVM_RUN return (now, or at its next entry) with EINTR."""
        self.run_struct.immediate_exit = 1
        ident = self.thread_ident
        if ident is not None and ident != threading.get_ident():
            try:
                signal.pthread_kill(ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass  # the thread has ended; immediate_exit covers a later run

    # -- registers -------------------------------------------------------------

    def _get(self, name: str, ctype: str) -> Any:
        obj = ffi.new(ctype)
        ioctl(self.fd, name, obj, f"vcpu {self.id}")
        return obj

    def _set(self, name: str, obj: Any) -> None:
        ioctl(self.fd, name, obj, f"vcpu {self.id}")

    def get_regs(self) -> Any:
        """KVM_GET_REGS: general-purpose registers, RIP and RFLAGS (struct kvm_regs)."""
        return self._get("KVM_GET_REGS", "struct kvm_regs *")

    def set_regs(self, regs: Any) -> None:
        """KVM_SET_REGS."""
        self._set("KVM_SET_REGS", regs)

    def get_sregs(self) -> Any:
        """KVM_GET_SREGS: segments, descriptor tables, control registers, EFER."""
        return self._get("KVM_GET_SREGS", "struct kvm_sregs *")

    def set_sregs(self, sregs: Any) -> None:
        """KVM_SET_SREGS."""
        self._set("KVM_SET_SREGS", sregs)

    def get_fpu(self) -> Any:
        """KVM_GET_FPU: x87 and SSE state in FXSAVE layout."""
        return self._get("KVM_GET_FPU", "struct kvm_fpu *")

    def set_fpu(self, fpu: Any) -> None:
        """KVM_SET_FPU."""
        self._set("KVM_SET_FPU", fpu)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS: {index: value} for the MSRs KVM could read (in order, up to the first failure)."""
        indices = list(indices)
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for e, i in zip(msrs.entries[0:len(indices)], indices):
            e.index = i
        n = ioctl(self.fd, "KVM_GET_MSRS", msrs, f"vcpu {self.id}")
        return {e.index: e.data for e in msrs.entries[0:n]}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        """KVM_SET_MSRS: raises naming the first MSR KVM refused."""
        items = list(values.items())
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
        for e, (i, v) in zip(msrs.entries[0:len(items)], items):
            e.index, e.data = i, v
        n = ioctl(self.fd, "KVM_SET_MSRS", msrs, f"vcpu {self.id}")
        if n != len(items):
            raise KvmError(f"KVM_SET_MSRS: vcpu {self.id} refused MSR {items[n][0]:#x} = {items[n][1]:#x}")

    def get_msrs_skipping(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS over the whole list, skipping an MSR KVM cannot read instead of stopping there."""
        values: dict[int, int] = {}
        todo = list(indices)
        while todo:
            got = self.get_msrs(todo)
            values.update(got)
            todo = todo[len(got) + 1:]  # the first one not returned failed; go on after it
        return values

    def set_msrs_skipping(self, values: Mapping[int, int]) -> list[int]:
        """KVM_SET_MSRS of everything, going on past refusals; returns the MSRs KVM refused (read-only ones)."""
        refused = []
        items = list(values.items())
        while items:
            msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
            for e, (i, v) in zip(msrs.entries[0:len(items)], items):
                e.index, e.data = i, v
            n = ioctl(self.fd, "KVM_SET_MSRS", msrs, f"vcpu {self.id}")
            if n < len(items):
                refused.append(items[n][0])
            items = items[n + 1:]
        return refused

    def set_cpuid2(self, entries: Iterable[Any]) -> None:
        """KVM_SET_CPUID2: the CPUID table the guest sees (entries with function/index/eax..edx)."""
        entries = list(entries)
        c = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        for dst, src in zip(c.entries[0:len(entries)], entries):
            for f in ("function", "index", "flags", "eax", "ebx", "ecx", "edx"):
                setattr(dst, f, getattr(src, f))
        ioctl(self.fd, "KVM_SET_CPUID2", c, f"vcpu {self.id}: {len(entries)} entries")

    def get_cpuid2(self, max_entries: int = 256) -> list[Any]:
        """KVM_GET_CPUID2: the table last set."""
        c = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
        ioctl(self.fd, "KVM_GET_CPUID2", c, f"vcpu {self.id}")
        return list(c.entries[0:c.nent])

    def get_lapic(self) -> Any:
        """KVM_GET_LAPIC: the in-kernel local APIC's register page."""
        return self._get("KVM_GET_LAPIC", "struct kvm_lapic_state *")

    def set_lapic(self, lapic: Any) -> None:
        """KVM_SET_LAPIC."""
        self._set("KVM_SET_LAPIC", lapic)

    def get_vcpu_events(self) -> Any:
        """KVM_GET_VCPU_EVENTS: pending/injected exception, interrupt, NMI, SMI."""
        return self._get("KVM_GET_VCPU_EVENTS", "struct kvm_vcpu_events *")

    def set_vcpu_events(self, events: Any) -> None:
        """KVM_SET_VCPU_EVENTS."""
        self._set("KVM_SET_VCPU_EVENTS", events)

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        """Queue exception `vector` for delivery at the next entry (KVM_SET_VCPU_EVENTS)."""
        ev = self.get_vcpu_events()
        ev.exception.nr = vector
        ev.exception.injected = 1
        ev.exception.has_error_code = 1 if error_code is not None else 0
        ev.exception.error_code = error_code or 0
        ev.flags = 0
        self.set_vcpu_events(ev)

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE: RUNNABLE, HALTED, INIT_RECEIVED, ..."""
        return self._get("KVM_GET_MP_STATE", "struct kvm_mp_state *").mp_state

    def set_mp_state(self, state: int) -> None:
        """KVM_SET_MP_STATE."""
        self._set("KVM_SET_MP_STATE", ffi.new("struct kvm_mp_state *", {"mp_state": state}))

    def get_debugregs(self) -> Any:
        """KVM_GET_DEBUGREGS: DR0-3, DR6, DR7."""
        return self._get("KVM_GET_DEBUGREGS", "struct kvm_debugregs *")

    def set_debugregs(self, dr: Any) -> None:
        """KVM_SET_DEBUGREGS."""
        self._set("KVM_SET_DEBUGREGS", dr)

    def get_xcrs(self) -> dict[int, int]:
        """KVM_GET_XCRS: {xcr index: value} (XCR0 is index 0)."""
        x = self._get("KVM_GET_XCRS", "struct kvm_xcrs *")
        return {e.xcr: e.value for e in x.xcrs[0:x.nr_xcrs]}

    def set_xcrs(self, values: Mapping[int, int]) -> None:
        """KVM_SET_XCRS."""
        x = ffi.new("struct kvm_xcrs *")
        x.nr_xcrs = len(values)
        for e, (i, v) in zip(x.xcrs, values.items()):
            e.xcr, e.value = i, v
        self._set("KVM_SET_XCRS", x)

    def get_xsave(self) -> bytes:
        """KVM_GET_XSAVE: the 4 KiB XSAVE area."""
        return bytes(ffi.buffer(self._get("KVM_GET_XSAVE", "struct kvm_xsave *")))

    def set_xsave(self, data: bytes | Any) -> None:
        """KVM_SET_XSAVE, from bytes or a `struct kvm_xsave *` (no copy)."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            x = ffi.new("struct kvm_xsave *")
            ffi.buffer(x)[0:len(data)] = data
            data = x
        self._set("KVM_SET_XSAVE", data)

    def set_guest_debug(self, control: int, debugreg: Iterable[int] = ()) -> None:
        """KVM_SET_GUEST_DEBUG: KVM_GUESTDBG_* flags (ENABLE, SINGLESTEP, USE_SW_BP, USE_HW_BP)."""
        d = ffi.new("struct kvm_guest_debug *")
        d.control = control
        for i, v in enumerate(debugreg):
            d.arch.debugreg[i] = v
        self._set("KVM_SET_GUEST_DEBUG", d)

    def nmi(self) -> None:
        """KVM_NMI: queue an NMI (through the in-kernel LAPIC's LINT1 when there is one)."""
        ioctl_int(self.fd, "KVM_NMI", 0, f"vcpu {self.id}")

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT: inject an external interrupt (only without an in-kernel irqchip)."""
        self._set("KVM_INTERRUPT", ffi.new("struct kvm_interrupt *", {"irq": vector}))

    def translate(self, linear_address: int) -> int | None:
        """KVM_TRANSLATE: the GPA KVM's MMU gives `linear_address` now, or None if unmapped."""
        t = ffi.new("struct kvm_translation *")
        t.linear_address = linear_address
        self._set("KVM_TRANSLATE", t)
        return t.physical_address if t.valid else None

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the vCPU."""
        ec = ffi.new("struct kvm_enable_cap *")
        ec.cap, ec.flags = int(cap), flags
        for i, a in enumerate(args):
            ec.args[i] = a
        self._set("KVM_ENABLE_CAP", ec)

    def get_stats_fd(self) -> int:
        """KVM_GET_STATS_FD: a file of this vCPU's binary statistics (caller owns the fd)."""
        return ioctl_int(self.fd, "KVM_GET_STATS_FD", 0, f"vcpu {self.id}")

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ."""
        return ioctl_int(self.fd, "KVM_GET_TSC_KHZ", 0, f"vcpu {self.id}")

    # -- synced registers (KVM_CAP_SYNC_REGS) ----------------------------------

    @property
    def sync_regs(self) -> Any:
        """run->s.regs: registers KVM copies in and out of kvm_run around each KVM_RUN.

        Set `run_struct.kvm_valid_regs` (KVM_SYNC_X86_REGS | _SREGS | _EVENTS)
        once, then read here after an exit; after editing, set the matching bit
        in `run_struct.kvm_dirty_regs`.
        """
        return self.run_struct.s.regs

    # -- saved state -------------------------------------------------------------

    def snapshot_state(self, msr_indices: Iterable[int]) -> dict[str, Any]:
        """Everything KVM keeps of this vCPU, JSON-able: MP state, registers, FPU/XSAVE, XCRs,
        debug registers, LAPIC, the MSRs of `msr_indices` KVM can read, pending events."""
        s: dict[str, Any] = {
            "id": self.id,
            "mp_state": self.get_mp_state(),
            "regs": to_blob(self.get_regs()),
            "sregs": to_blob(self.get_sregs()),
            "fpu": to_blob(self.get_fpu()),
            "debugregs": to_blob(self.get_debugregs()),
            "lapic": to_blob(self.get_lapic()),
            "msrs": {f"{k:#x}": v for k, v in self.get_msrs_skipping(msr_indices).items()},
            "vcpu_events": to_blob(self.get_vcpu_events()),
        }
        if self.vm.check_extension(lib.KVM_CAP_XSAVE):
            s["xsave"] = base64.b64encode(self.get_xsave()).decode()
        if self.vm.check_extension(lib.KVM_CAP_XCRS):
            s["xcrs"] = {str(k): v for k, v in self.get_xcrs().items()}
        return s

    def restore_state(self, s: Mapping[str, Any]) -> list[int]:
        """Load a `snapshot_state()` in the order KVM wants; returns the MSRs KVM refused to set.

        The order of the KVM API document's migration notes (and Firecracker's
        vstate/vcpu): MP state, regs, sregs, XSAVE/FPU, XCRs, debug registers,
        LAPIC (before the MSRs: TSC deadline needs the LAPIC mode), MSRs, events.
        """
        self.set_mp_state(s["mp_state"])
        self.set_regs(from_blob("regs", s["regs"]))
        self.set_sregs(from_blob("sregs", s["sregs"]))
        if "xsave" in s:
            self.set_xsave(base64.b64decode(s["xsave"]))
        else:
            self.set_fpu(from_blob("fpu", s["fpu"]))
        if "xcrs" in s:
            self.set_xcrs({int(k): v for k, v in s["xcrs"].items()})
        self.set_debugregs(from_blob("debugregs", s["debugregs"]))
        self.set_lapic(from_blob("lapic", s["lapic"]))
        refused = self.set_msrs_skipping({int(k, 16): v for k, v in s["msrs"].items()})
        self.set_vcpu_events(from_blob("vcpu_events", s["vcpu_events"]))
        return refused

    def cpu_mode(self, sregs: Any | None = None) -> str:
        """'real', 'protected16', 'protected32', 'long64' or 'compat' from CR0/EFER/CS."""
        s = sregs if sregs is not None else self.get_sregs()
        if not s.cr0 & 1:
            return "real"
        if s.efer & (1 << 10):
            return "long64" if s.cs.l else "compat"
        return "protected32" if s.cs.db else "protected16"

    def map_dirty_ring(self, entries: int) -> DirtyRing:
        """mmap this vCPU's dirty ring (KVM_DIRTY_LOG_PAGE_OFFSET pages into the vCPU fd)."""
        size = entries * ffi.sizeof("struct kvm_dirty_gfn")
        try:
            m = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                          offset=lib.KVM_DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE)
        except OSError as e:
            raise KvmError(f"vcpu {self.id}: cannot mmap its dirty ring of {entries} entries ({e.strerror})") from e
        self.dirty_ring = DirtyRing(m, entries)
        return self.dirty_ring

    # -- lifetime --------------------------------------------------------------

    def close(self) -> None:
        if self.dirty_ring is not None:
            self.dirty_ring.close()
            self.dirty_ring = None
        if self.fd >= 0:
            self.run_struct = None
            ffi.release(self._buffer)
            self.page.release()
            try:
                self._page.close()
            except BufferError:
                pass  # an exit record still views the page; it is unmapped when that goes
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Vcpu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Vcpu(id={self.id}, fd={self.fd})"
