"""Warm reset: bring a used VM back to a checkpoint without building it again.

    cp = vm.checkpoint()        # memory image, vCPU, irqchip, PIT, clock (and devices) now
    ... run the guest ...
    cp.reset()                  # the pages dirtied since, and the state, are as they were

A checkpoint keeps a private copy of guest RAM and starts dirty tracking
(`kvmpy.dirty`: the dirty ring where the VM enabled it, else the bitmap). A
reset copies back only the pages the vCPUs dirtied since the checkpoint (or
the last reset), plus those the VMM declared with `note_write` (KVM does not
see writes through the VMM's own mapping), then restores per vCPU:

- regs, sregs and vcpu events (pending/injected exception, interrupt, NMI,
  interrupt shadow) through kvm_run's synced registers (KVM_CAP_SYNC_REGS:
  KVM loads them at the next KVM_RUN, no ioctl), or the ioctls without it;
- x87/SSE/AVX state with one KVM_SET_XSAVE (or KVM_SET_FPU: x87 and SSE only,
  enough for a guest that cannot enable XSAVE);
- the MSRs in `msrs` (syscall and sysenter entry points, FS/GS bases, PAT,
  TSC_AUX by default; the TSC keeps counting), debug registers and XCRs;
- with an in-kernel irqchip: LAPIC, MP state, both PICs and the IOAPIC; the
  PIT and kvmclock when the VM has them; devices through their own
  `snapshot_state()` / `restore_state()`.

Hot pages: with the bitmap and manual protect, a page two resets in a row
found dirty is left writable (not cleared) and copied back at every reset,
so the guest's next write costs no fault (`hot_limit` pages at most).

Why a copy and not a fresh MAP_PRIVATE mapping of a memfd: dropping pages
(MADV_DONTNEED) makes every page the guest touches next fault in again (through
the MMU notifier; ~25 us a page inside KVM_RUN on this project's backend); copying the few
dirty pages back keeps KVM's mappings (scripts/bench_microvm.py measures both).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ._kvm import ffi, lib
from .dirty import DirtyLogMode
from .errors import KvmError
from .memory import PAGE_SIZE

SYNC_REGS = lib.KVM_SYNC_X86_REGS | lib.KVM_SYNC_X86_SREGS | lib.KVM_SYNC_X86_EVENTS

# MSRs a guest kernel changes and a reset must bring back (Intel SDM vol. 4).
DEFAULT_MSRS: tuple[int, ...] = (
    0x174, 0x175, 0x176,  # IA32_SYSENTER_CS / ESP / EIP
    0x277,  # IA32_PAT
    0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084,  # STAR, LSTAR, CSTAR, SFMASK
    0xC000_0100, 0xC000_0101, 0xC000_0102,  # FS_BASE, GS_BASE, KERNEL_GS_BASE
    0xC000_0103,  # TSC_AUX
)

# At most this many pages stay writable: each costs a page copy per reset (~0.3 us)
# instead of a write fault per call (~25 us on this project's shadow-paging backend).
DEFAULT_HOT_LIMIT = 256

_SYNC_REGS_EVENTS = lib.KVM_SYNC_X86_REGS | lib.KVM_SYNC_X86_EVENTS
_REGS_SIZE = ffi.sizeof("struct kvm_regs")
_SREGS_SIZE = ffi.sizeof("struct kvm_sregs")
_EVENTS_SIZE = ffi.sizeof("struct kvm_vcpu_events")
_EVENTS_RESTORE_FLAGS = (lib.KVM_VCPUEVENT_VALID_NMI_PENDING | lib.KVM_VCPUEVENT_VALID_SHADOW
                         | lib.KVM_VCPUEVENT_VALID_SIPI_VECTOR)


@dataclass
class ResetStats:
    """What one `Checkpoint.reset` did."""

    pages: int  # pages copied back
    full: bool  # all of memory was copied (a dirty ring had overflowed)
    seconds: float


_ZERO_PAGE = bytes(PAGE_SIZE)


class RegionImage:
    """A region's content at the checkpoint, keeping only its non-zero pages (most of a fresh guest's
    RAM is zero: a 16 MiB sandbox keeps ~100 KiB, not 16 MiB per warm VM)."""

    def __init__(self, view: memoryview) -> None:
        self.size = len(view)
        self.pages: dict[int, bytes] = {}
        for i, a in enumerate(range(0, self.size, PAGE_SIZE)):
            page = bytes(view[a:a + PAGE_SIZE])  # page by page: no temporary copy of all of RAM
            if page != _ZERO_PAGE:
                self.pages[i] = page

    def page(self, index: int) -> bytes:
        return self.pages.get(index, _ZERO_PAGE)

    def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the region as checkpointed."""
        first, last = offset // PAGE_SIZE, (offset + size - 1) // PAGE_SIZE
        data = b"".join(self.page(p) for p in range(first, last + 1))
        start = offset - first * PAGE_SIZE
        return data[start:start + size]


class _VcpuState:
    """One vCPU's state at the checkpoint, as the cffi structs the restore hands KVM."""

    def __init__(self, vcpu: Any, *, msrs: Sequence[int], fpu: str, irqchip: bool, system: bool) -> None:
        self.vcpu = vcpu
        self.regs = vcpu.get_regs()
        self.sregs = vcpu.get_sregs()
        self.sregs_bytes = bytes(ffi.buffer(self.sregs))
        self.events = vcpu.get_vcpu_events()
        self.events.flags |= _EVENTS_RESTORE_FLAGS  # so a restore also clears a pending NMI
        self.fpu_kind = fpu
        self.fpu = vcpu.get_fpu() if fpu == "fpu" else ffi.new("struct kvm_xsave *")
        if fpu == "xsave":
            ffi.buffer(self.fpu)[:] = vcpu.get_xsave()
        self.msrs = vcpu.get_msrs(msrs) if system and msrs else {}
        self.debugregs = vcpu.get_debugregs() if system else None
        self.xcrs = vcpu.get_xcrs() if system and fpu == "xsave" else None
        self.lapic = vcpu.get_lapic() if irqchip else None
        self.mp_state = vcpu.get_mp_state() if irqchip else None
        self.sync = vcpu.vm.check_extension(lib.KVM_CAP_SYNC_REGS) & SYNC_REGS == SYNC_REGS
        if self.sync:
            run = vcpu.run_struct
            run.kvm_valid_regs |= SYNC_REGS
            s = run.s.regs
            # kvm_run stays mapped at one place: resolve its fields once, not per reset.
            self._run = run
            self._dst_regs = ffi.addressof(s, "regs")
            self._dst_events = ffi.addressof(s, "events")
            self._dst_sregs = ffi.addressof(s, "sregs")
            self._cur_sregs = ffi.buffer(self._dst_sregs, _SREGS_SIZE)

    def restore(self) -> None:
        vcpu = self.vcpu
        if self.sync:
            dirty = _SYNC_REGS_EVENTS
            ffi.memmove(self._dst_regs, self.regs, _REGS_SIZE)
            ffi.memmove(self._dst_events, self.events, _EVENTS_SIZE)
            # KVM stored the current sregs at the exit: load them only when they differ (a CPL3
            # guest rarely changes one), sparing KVM the segment and control-register checks.
            if self._cur_sregs[:] != self.sregs_bytes:
                ffi.memmove(self._dst_sregs, self.sregs, _SREGS_SIZE)
                dirty |= lib.KVM_SYNC_X86_SREGS
            self._run.kvm_dirty_regs |= dirty  # applied by KVM at the next KVM_RUN
        else:
            vcpu.set_sregs(self.sregs)
            vcpu.set_regs(self.regs)
            vcpu.set_vcpu_events(self.events)
        if self.fpu_kind == "fpu":
            vcpu.set_fpu(self.fpu)
        else:
            if self.xcrs:
                vcpu.set_xcrs(self.xcrs)
            vcpu.set_xsave(self.fpu)
        if self.msrs:
            vcpu.set_msrs(self.msrs)
        if self.debugregs is not None:
            vcpu.set_debugregs(self.debugregs)
        if self.lapic is not None:
            vcpu.set_lapic(self.lapic)
            vcpu.set_mp_state(self.mp_state)


class Checkpoint:
    """The state of a `Vm` at one moment; `reset()` brings the VM back to it, as often as wanted.

    Take it with the vCPUs stopped (not inside KVM_RUN); reset likewise.
    `system=False` skips what only CPL0 code can change (MSRs, debug
    registers, XCRs): sound for a guest whose own code all runs at CPL3, and
    two to three ioctls cheaper. `fpu="fpu"` restores x87/SSE with
    KVM_SET_FPU instead of KVM_SET_XSAVE (on this project's PVM backend
    KVM_SET_FPU does not reach the guest: use the default there).
    """

    def __init__(self, vm: Any, *, msrs: Sequence[int] = DEFAULT_MSRS, system: bool = True,
                 fpu: str | None = None, devices: Iterable[Any] = (),
                 dirty_mode: DirtyLogMode | str | None = None, hot_limit: int = DEFAULT_HOT_LIMIT) -> None:
        if not vm.vcpus:
            raise KvmError("a checkpoint needs the VM's vCPUs: create them first")
        if fpu is None:
            fpu = "xsave" if vm.check_extension(lib.KVM_CAP_XSAVE) else "fpu"
        if fpu not in ("xsave", "fpu"):
            raise ValueError(f"fpu {fpu!r}: must be 'xsave' or 'fpu'")
        self.vm = vm
        self.devices = list(devices)
        tracker = vm.dirty_tracker
        if tracker is None or not tracker.active:
            tracker = vm.start_dirty_tracking(dirty_mode)
        self.tracker = tracker
        tracker.collect()  # writes before this moment belong to the image
        self.regions = {r.slot: r for r in tracker.regions}
        self.image = {slot: RegionImage(r.view) for slot, r in self.regions.items()}
        self._noted: dict[int, set[int]] = {}
        # Hot pages: dirtied by two resets in a row, then left writable (no write fault per call)
        # and copied back at every reset. Only where the tracker can leave pages writable.
        self.hot: dict[int, set[int]] = {}
        self.hot_limit = hot_limit if self.tracker.can_leave_writable else 0
        self._hot_count = 0
        self._last: dict[int, list[int]] = {}
        self.vcpus = [_VcpuState(v, msrs=msrs, fpu=fpu, irqchip=vm.has_irqchip, system=system)
                      for v in vm.vcpus]
        self.irqchips = [vm.get_irqchip(c) for c in range(3)] if vm.has_irqchip else []
        self.pit = vm.get_pit2() if getattr(vm, "has_pit", False) else None
        self.clock = vm.get_clock() if vm.has_irqchip else None
        self.device_states = [d.snapshot_state() for d in self.devices]
        self.resets = 0

    def note_write(self, gpa: int, size: int) -> None:
        """The VMM wrote [gpa, gpa+size) through its own mapping: restore those pages at the next reset."""
        for slot, r in self.regions.items():
            lo, hi = max(gpa, r.gpa), min(gpa + size, r.end)
            if lo < hi:
                self._noted.setdefault(slot, set()).update(
                    range((lo - r.gpa) // PAGE_SIZE, (hi - 1 - r.gpa) // PAGE_SIZE + 1))

    def _promote(self, dirty: dict[int, list[int]]) -> None:
        # Pages this collect and the previous one both reported: left writable from the next collect on.
        for slot, pages in dirty.items():
            last = self._last.get(slot)
            if not last or self._hot_count >= self.hot_limit:
                continue
            again = set(pages).intersection(last)
            hot = self.hot.setdefault(slot, set())
            for p in sorted(again - hot)[:self.hot_limit - self._hot_count]:
                hot.add(p)
                self._hot_count += 1
        self._last = dirty

    def reset(self) -> ResetStats:
        """Copy back the pages dirtied since the checkpoint (or the last reset) and restore all state."""
        t0 = time.perf_counter()
        hot = self.hot
        dirty = self.tracker.collect(hot if self.hot_limit else None)
        full = self.tracker.lost
        copied = 0
        for slot, region in self.regions.items():
            image = self.image[slot]
            view = region.view
            if full:
                pages = range(region.size // PAGE_SIZE)
                for p in pages:
                    view[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = image.page(p)
                copied += len(pages)
                continue
            pages = dirty.get(slot, [])
            noted, hot_pages = self._noted.get(slot), hot.get(slot)
            if noted or hot_pages:
                pages = sorted(set(pages).union(noted or (), hot_pages or ()))
            get = image.pages.get
            for p in pages:
                view[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = get(p, _ZERO_PAGE)
            copied += len(pages)
        self.tracker.lost = False
        self._noted.clear()
        if self.hot_limit:
            self._promote(dirty)
        for v in self.vcpus:
            v.restore()
        vm = self.vm
        for chip in self.irqchips:
            vm.set_irqchip(chip)
        if self.pit is not None:
            vm.set_pit2(self.pit)
        if self.clock is not None:
            vm.set_clock(self.clock.clock)
        for d, s in zip(self.devices, self.device_states):
            d.restore_state(s)
        self.resets += 1
        return ResetStats(copied, full, time.perf_counter() - t0)


__all__ = ["DEFAULT_MSRS", "SYNC_REGS", "Checkpoint", "ResetStats"]
