"""Dirty-page tracking: which guest pages were written since a point in time.

    tracker = vm.start_dirty_tracking()          # the dirty ring where the VM has one, else the bitmap
    ... run the guest ...
    tracker.collect()                            # {slot: [page index in slot, ...]} and re-arm

Two mechanisms behind one API (KVM API document, 4.8 KVM_GET_DIRTY_LOG and
8.29 KVM_CAP_DIRTY_LOG_RING):

- BITMAP: every slot gets KVM_MEM_LOG_DIRTY_PAGES; `collect` reads each
  slot's bitmap with KVM_GET_DIRTY_LOG. With KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
  the read does not re-protect; `collect` then clears exactly the bits it
  read with KVM_CLEAR_DIRTY_LOG (so a page written between the two is not
  lost), one ioctl skipped when nothing was dirty.
- RING: the VM enabled KVM_CAP_DIRTY_LOG_RING(_ACQ_REL) before its vCPUs
  (`Vm.enable_dirty_ring`); KVM appends (slot, offset) to the running vCPU's
  ring on its first write to a page; `collect` harvests every ring (a C
  helper: acquire-load DIRTY, release-store RESET) and calls
  KVM_RESET_DIRTY_RINGS, which write-protects the harvested pages again. A
  ring that fills makes KVM_RUN exit with KVM_EXIT_DIRTY_RING_FULL;
  `on_ring_full` (a `VcpuLoop` handler) harvests into the pending set and
  lets the vCPU go on. A ring found completely full may have dropped pages
  (KVM exits at a soft limit below the size; this project's PVM backend
  does not while it emulates CPL0 code): `lost` is then set, and callers
  that need every page (the warm reset) fall back to all of memory.

Writes the VMM makes through its own mapping are not seen by KVM; callers
that write guest memory themselves account for those pages (the warm reset
does). Collect while the vCPUs are stopped: a page a vCPU dirties during a
collect is reported by the next one.
"""

from __future__ import annotations

import enum
from typing import Any

from ._kvm import ffi, lib
from .errors import CapabilityError, KvmError
from .memory import PAGE_SIZE

_CAP_RING_ACQ_REL = lib.KVM_CAP_DIRTY_LOG_RING_ACQ_REL
_CAP_RING = lib.KVM_CAP_DIRTY_LOG_RING
_CAP_MANUAL = lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
_HARVEST_CHUNK = 4096

DEFAULT_RING_ENTRIES = 4096  # 64 KiB per vCPU; a power of two, as KVM requires


class DirtyLogMode(enum.StrEnum):
    """How the VM's dirty pages are found."""

    BITMAP = "bitmap"  # KVM_GET_DIRTY_LOG (+ KVM_CLEAR_DIRTY_LOG)
    RING = "ring"  # KVM_CAP_DIRTY_LOG_RING, one ring per vCPU


def ring_capability(vm: Any) -> int:
    """The dirty-ring capability this VM offers (the ACQ_REL one first), or 0."""
    for cap in (_CAP_RING_ACQ_REL, _CAP_RING):
        if vm.check_extension(cap) > 0:
            return cap
    return 0


class DirtyRing:
    """One vCPU's dirty ring: the mmap of `entries` struct kvm_dirty_gfn at KVM_DIRTY_LOG_PAGE_OFFSET."""

    def __init__(self, mapping: Any, entries: int) -> None:
        self.mapping = mapping
        self.entries = entries
        self._buffer = ffi.from_buffer(mapping)
        self.gfns = ffi.cast("struct kvm_dirty_gfn *", self._buffer)
        self.fetch = ffi.new("uint32_t *", 0)  # the next entry to harvest (KVM's fetch_index mirror)
        self._out = ffi.new("uint64_t[]", _HARVEST_CHUNK)
        self.full = False  # the last harvest found the ring full

    def harvest(self, into: dict[int, set[int]]) -> int:
        """Move every published entry into `into` ({slot: {page}}); returns how many there were."""
        total = 0
        out = self._out
        while True:
            n = lib.kvmpy_harvest_dirty_ring(self.gfns, self.entries, self.fetch, out, _HARVEST_CHUNK)
            for v in out[0:n]:
                into.setdefault(v >> 32, set()).add(v & 0xFFFF_FFFF)
            total += n
            if n < _HARVEST_CHUNK:
                self.full = total >= self.entries  # every slot was taken: later writes had no room
                return total

    def close(self) -> None:
        if self.mapping is not None:
            self.gfns = None
            ffi.release(self._buffer)
            try:
                self.mapping.close()
            except BufferError:
                pass
            self.mapping = None


class DirtyTracker:
    """The pages of a `Vm`'s slots written by its vCPUs since `start()` or the last `collect()`.

    Owned by the Vm (`Vm.start_dirty_tracking`); tracks every region of the
    Vm's `GuestMemory` objects at start.
    """

    def __init__(self, vm: Any, mode: DirtyLogMode, *, manual_protect: bool | None = None) -> None:
        self.vm = vm
        self.mode = DirtyLogMode(mode)
        if self.mode is DirtyLogMode.RING and not vm.dirty_ring_entries:
            raise CapabilityError("dirty ring tracking needs Vm.enable_dirty_ring() before the first vCPU")
        if manual_protect is None:
            manual_protect = vm.check_extension(_CAP_MANUAL) > 0
        self.manual_protect = bool(manual_protect) and self.mode is DirtyLogMode.BITMAP
        self.regions: list[Any] = []
        self._pending: dict[int, set[int]] = {}
        self._bitmaps: dict[int, Any] = {}
        self.active = False
        self.ring_full_exits = 0
        self.lost = False  # a ring overflowed since start: some written pages may be missing

    def start(self) -> DirtyTracker:
        """Turn on KVM_MEM_LOG_DIRTY_PAGES for every slot: from now on, writes are recorded."""
        if self.active:
            raise KvmError("dirty tracking is already started")
        if self.manual_protect:
            self.vm.enable_cap(_CAP_MANUAL, lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        self.regions = [r for mem in self.vm.memory for r in mem if not r.readonly]
        for r in self.regions:
            r.dirty_log = True
            self.vm.add_region(r)  # the same slot again: only its flags change
            words = max((r.size // PAGE_SIZE + 63) // 64, 1)
            self._bitmaps[r.slot] = ffi.new("uint64_t[]", words)
        self.active = True
        return self

    @property
    def can_leave_writable(self) -> bool:
        """Whether `collect(leave_writable=...)` is honoured (bitmap with manual protect only)."""
        return self.manual_protect

    def collect(self, leave_writable: dict[int, set[int]] | None = None) -> dict[int, list[int]]:
        """{slot: sorted page indexes within the slot} written since the last collect; re-arms tracking.

        `leave_writable` ({slot: pages}, bitmap with manual protect only): of
        the pages reported, these are not cleared (KVM_CLEAR_DIRTY_LOG) and so
        not write-protected again: the guest writes them without a fault, and
        they are reported by every collect from now on.
        """
        if not self.active:
            raise KvmError("dirty tracking is not started")
        if self.mode is DirtyLogMode.RING:
            pages = self._pending
            self._pending = {}
            if self._harvest(pages):
                self.vm.reset_dirty_rings()
            return {slot: sorted(p) for slot, p in sorted(pages.items())}
        keep = leave_writable if self.manual_protect and leave_writable else {}
        return {r.slot: self._collect_bitmap(r, keep.get(r.slot)) for r in self.regions}

    def _harvest(self, into: dict[int, set[int]]) -> int:
        total = 0
        for v in self.vm.vcpus:
            ring = v.dirty_ring
            if ring is not None:
                total += ring.harvest(into)
                self.lost |= ring.full
        return total

    def _collect_bitmap(self, region: Any, keep: set[int] | None = None) -> list[int]:
        bitmap = self._bitmaps[region.slot]
        self.vm.get_dirty_bitmap(region.slot, bitmap)
        raw = ffi.buffer(bitmap)
        bits = int.from_bytes(raw, "little")
        if not bits:
            return []
        if self.manual_protect:
            protect = bits
            for p in keep or ():
                protect &= ~(1 << p)
            if protect:
                if protect != bits:
                    raw[:] = protect.to_bytes(len(raw), "little")
                self.vm.clear_dirty_log(region.slot, 0, region.size // PAGE_SIZE, bitmap)
        pages = []
        while bits:
            low = bits & -bits
            pages.append(low.bit_length() - 1)
            bits ^= low
        return pages

    def on_ring_full(self, exit: Any = None) -> bool:
        """VcpuLoop handler for KVM_EXIT_DIRTY_RING_FULL: harvest, reset, keep running."""
        self.ring_full_exits += 1
        self._harvest(self._pending)
        self.vm.reset_dirty_rings()
        return True

    def stop(self) -> None:
        """Turn dirty logging off again (the slots keep their memory)."""
        if not self.active:
            return
        if self.mode is DirtyLogMode.RING:
            self._harvest({})
            self.vm.reset_dirty_rings()
        for r in self.regions:
            r.dirty_log = False
            if self.vm.fd >= 0:
                self.vm.add_region(r)
        self.active = False
        self._pending.clear()


__all__ = ["DEFAULT_RING_ENTRIES", "DirtyLogMode", "DirtyRing", "DirtyTracker", "ring_capability"]
