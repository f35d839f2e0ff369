"""`Vm`: a virtual machine file descriptor.

One method per VM ioctl, named after it (KVM API document, section 4),
plus `add_memory` to hand a whole `GuestMemory` to KVM.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any, Iterable

from ._ioctl import ioctl, ioctl_int
from ._kvm import ffi, lib
from .blobs import from_blob, to_blob
from .dirty import DEFAULT_RING_ENTRIES, DirtyLogMode, DirtyTracker, ring_capability
from .errors import CapabilityError, KvmError, KvmIoctlError, SnapshotError
from .memory import PAGE_SIZE, GuestMemory, MemoryRegion
from .vcpu import Vcpu
from .warm import Checkpoint, ResetStats

MEM_LOG_DIRTY_PAGES = lib.KVM_MEM_LOG_DIRTY_PAGES
MEM_READONLY = lib.KVM_MEM_READONLY

IRQCHIP_PIC_MASTER = lib.KVM_IRQCHIP_PIC_MASTER
IRQCHIP_PIC_SLAVE = lib.KVM_IRQCHIP_PIC_SLAVE
IRQCHIP_IOAPIC = lib.KVM_IRQCHIP_IOAPIC
IRQCHIPS = {"pic_master": IRQCHIP_PIC_MASTER, "pic_slave": IRQCHIP_PIC_SLAVE, "ioapic": IRQCHIP_IOAPIC}

# Where KVM may place the three pages it needs for real-mode emulation on
# VT-x (KVM_SET_TSS_ADDR) and the EPT identity map page: just below the
# 32-bit MMIO hole's BIOS area, as QEMU and Firecracker do.
DEFAULT_TSS_ADDR = 0xFFFB_D000
DEFAULT_IDENTITY_MAP_ADDR = 0xFFFB_C000


@dataclass(frozen=True)
class MsiRoute:
    gsi: int
    address: int
    data: int


@dataclass(frozen=True)
class IrqchipRoute:
    gsi: int
    irqchip: int
    pin: int


class Vm:
    """A KVM virtual machine: memory slots, irqchip, PIT, interrupts, vCPUs."""

    def __init__(self, fd: int, *, vcpu_mmap_size: int, system: Any = None) -> None:
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size
        self.system = system  # the Kvm this VM came from (kept alive with it)
        self.vcpus: list[Vcpu] = []
        self.memory: list[GuestMemory] = []
        self.has_irqchip = False
        self.has_pit = False
        self.dirty_ring_entries = 0  # per vCPU, once enable_dirty_ring succeeded
        self.dirty_tracker: DirtyTracker | None = None
        self.last_checkpoint: Checkpoint | None = None

    # -- capabilities ------------------------------------------------------

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (answers per VM, e.g. KVM_CAP_XSAVE2)."""
        return ioctl_int(self.fd, "KVM_CHECK_EXTENSION", int(cap))

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM: turn on an optional behaviour."""
        ec = ffi.new("struct kvm_enable_cap *")
        ec.cap = int(cap)
        ec.flags = flags
        for i, a in enumerate(args):
            ec.args[i] = a
        ioctl(self.fd, "KVM_ENABLE_CAP", ec, f"cap {int(cap)}")

    # -- memory ------------------------------------------------------------

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION: create, change or (size 0) delete a slot."""
        r = ffi.new("struct kvm_userspace_memory_region *")
        r.slot, r.flags = slot, flags
        r.guest_phys_addr, r.memory_size, r.userspace_addr = guest_phys_addr, memory_size, userspace_addr
        ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", r,
              f"slot {slot} at {guest_phys_addr:#x} size {memory_size:#x}")

    def add_memory(self, mem: GuestMemory) -> None:
        """Register every region of `mem` as a memory slot (slot numbers from the regions)."""
        for region in mem:
            self.add_region(region)
        self.memory.append(mem)

    def add_region(self, region: MemoryRegion) -> None:
        flags = (MEM_READONLY if region.readonly else 0) | (MEM_LOG_DIRTY_PAGES if region.dirty_log else 0)
        self.set_user_memory_region(region.slot, region.gpa, region.size, region.host_address, flags)

    def get_dirty_log(self, region: MemoryRegion) -> list[int]:
        """KVM_GET_DIRTY_LOG: guest page frame numbers written since the last call.

        The slot must have been added with dirty logging on.
        """
        npages = region.size // PAGE_SIZE
        words = (npages + 63) // 64
        bitmap = ffi.new("uint64_t[]", max(words, 1))
        log = ffi.new("struct kvm_dirty_log *")
        log.slot = region.slot
        log.dirty_bitmap = bitmap
        ioctl(self.fd, "KVM_GET_DIRTY_LOG", log, f"slot {region.slot}")
        base = region.gpa // PAGE_SIZE
        pages = []
        for w in range(words):
            bits = bitmap[w]
            while bits:
                low = bits & -bits
                pages.append(base + w * 64 + low.bit_length() - 1)
                bits ^= low
        return pages

    def get_dirty_bitmap(self, slot: int, bitmap: Any) -> None:
        """KVM_GET_DIRTY_LOG into `bitmap` (a cffi uint64_t array of one bit per page of the slot)."""
        log = ffi.new("struct kvm_dirty_log *")
        log.slot = slot
        log.dirty_bitmap = bitmap
        ioctl(self.fd, "KVM_GET_DIRTY_LOG", log, f"slot {slot}")

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: Any) -> None:
        """KVM_CLEAR_DIRTY_LOG: re-protect the pages whose bits are set (manual dirty-log protect)."""
        c = ffi.new("struct kvm_clear_dirty_log *")
        c.slot, c.first_page, c.num_pages, c.dirty_bitmap = slot, first_page, num_pages, bitmap
        ioctl(self.fd, "KVM_CLEAR_DIRTY_LOG", c, f"slot {slot} pages {first_page}+{num_pages}")

    def enable_dirty_ring(self, entries: int = DEFAULT_RING_ENTRIES) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]): a ring of `entries` dirty GFNs per vCPU.

        Must come before the first vCPU; each vCPU then maps its ring.
        """
        if self.vcpus:
            raise KvmError("the dirty ring must be enabled before the VM's first vCPU is created")
        if entries <= 0 or entries & (entries - 1):
            raise ValueError(f"dirty ring entries {entries}: must be a power of two")
        cap = ring_capability(self)
        if not cap:
            raise CapabilityError("this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING); use the bitmap")
        size = entries * ffi.sizeof("struct kvm_dirty_gfn")
        most = self.check_extension(cap)
        if size > most:
            raise ValueError(f"dirty ring of {entries} entries ({size} bytes) exceeds KVM's maximum of {most} bytes")
        self.enable_cap(cap, size)
        self.dirty_ring_entries = entries

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: re-protect every harvested ring entry; returns how many."""
        return ioctl_int(self.fd, "KVM_RESET_DIRTY_RINGS")

    def start_dirty_tracking(self, mode: DirtyLogMode | str | None = None, *,
                             manual_protect: bool | None = None) -> DirtyTracker:
        """Record guest writes to every slot from now on: the dirty ring if enabled, else the bitmap."""
        if self.dirty_tracker is not None and self.dirty_tracker.active:
            raise KvmError("this VM already tracks dirty pages; stop its tracker first")
        if mode is None:
            mode = DirtyLogMode.RING if self.dirty_ring_entries else DirtyLogMode.BITMAP
        self.dirty_tracker = DirtyTracker(self, DirtyLogMode(mode), manual_protect=manual_protect).start()
        return self.dirty_tracker

    def dirty_pages(self) -> dict[int, list[int]]:
        """{slot: sorted page indexes} written since tracking started or this was last called."""
        if self.dirty_tracker is None:
            raise KvmError("dirty tracking is not started (Vm.start_dirty_tracking)")
        return self.dirty_tracker.collect()

    def checkpoint(self, **options: Any) -> Checkpoint:
        """Remember this VM's memory and state now; `reset()` returns to it (kvmpy.warm.Checkpoint)."""
        self.last_checkpoint = Checkpoint(self, **options)
        return self.last_checkpoint

    def reset(self) -> ResetStats:
        """Bring the VM back to its last `checkpoint()`: dirtied pages and all vCPU/irqchip state."""
        if self.last_checkpoint is None:
            raise KvmError("reset() needs a checkpoint() of this VM first")
        return self.last_checkpoint.reset()

    # -- interrupt controllers and timers --------------------------------------

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC pair, IOAPIC and a LAPIC per vCPU."""
        ioctl_int(self.fd, "KVM_CREATE_IRQCHIP")
        self.has_irqchip = True

    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2: in-kernel i8254 PIT (ports 0x40-0x43, 0x61 speaker)."""
        cfg = ffi.new("struct kvm_pit_config *")
        cfg.flags = flags
        ioctl(self.fd, "KVM_CREATE_PIT2", cfg)
        self.has_pit = True

    def set_tss_addr(self, addr: int = DEFAULT_TSS_ADDR) -> None:
        """KVM_SET_TSS_ADDR: three pages KVM may use for real mode on VT-x."""
        ioctl_int(self.fd, "KVM_SET_TSS_ADDR", addr)

    def set_identity_map_addr(self, addr: int = DEFAULT_IDENTITY_MAP_ADDR) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: the EPT identity-map page for real mode on VT-x."""
        a = ffi.new("uint64_t *", addr)
        ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", a)

    def irq_line(self, irq: int, level: int) -> int:
        """KVM_IRQ_LINE_STATUS: drive GSI `irq` to `level`.

        Returns the status: > 0 delivered, 0 coalesced/masked, < 0 blocked.
        """
        il = ffi.new("struct kvm_irq_level *")
        il.irq = irq
        il.level = level
        ioctl(self.fd, "KVM_IRQ_LINE_STATUS", il, f"irq {irq} level {level}")
        return il.status

    def signal_msi(self, address: int, data: int) -> int:
        """KVM_SIGNAL_MSI: inject one MSI; returns >0 delivered, 0 blocked by the guest."""
        msi = ffi.new("struct kvm_msi *")
        msi.address_lo = address & 0xFFFF_FFFF
        msi.address_hi = address >> 32
        msi.data = data
        return ioctl(self.fd, "KVM_SIGNAL_MSI", msi, f"address {address:#x} data {data:#x}")

    def set_gsi_routing(self, routes: Iterable[MsiRoute | IrqchipRoute]) -> None:
        """KVM_SET_GSI_ROUTING: replace the whole GSI routing table."""
        routes = list(routes)
        table = ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": len(routes)})
        for e, r in zip(table.entries[0:len(routes)], routes):
            e.gsi = r.gsi
            if isinstance(r, MsiRoute):
                e.type = lib.KVM_IRQ_ROUTING_MSI
                e.u.msi.address_lo = r.address & 0xFFFF_FFFF
                e.u.msi.address_hi = r.address >> 32
                e.u.msi.data = r.data
            else:
                e.type = lib.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip = r.irqchip
                e.u.irqchip.pin = r.pin
        ioctl(self.fd, "KVM_SET_GSI_ROUTING", table, f"{len(routes)} routes")

    def default_gsi_routes(self) -> list[IrqchipRoute]:
        """The routing KVM_CREATE_IRQCHIP installs: GSI n on IOAPIC pin n, and GSI 0-15 on the PICs too.

        KVM_SET_GSI_ROUTING replaces the whole table, so callers adding MSI
        routes start from this list.
        """
        routes: list[IrqchipRoute] = []
        for gsi in range(lib.KVM_IOAPIC_NUM_PINS):
            if gsi < 8:
                routes.append(IrqchipRoute(gsi, IRQCHIP_PIC_MASTER, gsi))
            elif gsi < 16:
                routes.append(IrqchipRoute(gsi, IRQCHIP_PIC_SLAVE, gsi - 8))
            routes.append(IrqchipRoute(gsi, IRQCHIP_IOAPIC, gsi))
        return routes

    def irqfd(self, fd: int, gsi: int, *, resample_fd: int | None = None, deassign: bool = False) -> None:
        """KVM_IRQFD: writing to eventfd `fd` raises GSI `gsi` without a trip through userspace."""
        i = ffi.new("struct kvm_irqfd *")
        i.fd, i.gsi = fd, gsi
        if deassign:
            i.flags |= lib.KVM_IRQFD_FLAG_DEASSIGN
        if resample_fd is not None:
            i.flags |= lib.KVM_IRQFD_FLAG_RESAMPLE
            i.resamplefd = resample_fd
        ioctl(self.fd, "KVM_IRQFD", i, f"fd {fd} gsi {gsi}")

    def ioeventfd(self, fd: int, addr: int, length: int, *, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        """KVM_IOEVENTFD: a guest write to `addr` signals eventfd `fd` instead of exiting."""
        e = ffi.new("struct kvm_ioeventfd *")
        e.fd, e.addr, e.len = fd, addr, length
        if datamatch is not None:
            e.flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
            e.datamatch = datamatch
        if pio:
            e.flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            e.flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        ioctl(self.fd, "KVM_IOEVENTFD", e, f"fd {fd} at {addr:#x}")

    def get_irqchip(self, chip_id: int) -> Any:
        """KVM_GET_IRQCHIP: state of PIC master (0), PIC slave (1) or IOAPIC (2)."""
        chip = ffi.new("struct kvm_irqchip *")
        chip.chip_id = chip_id
        ioctl(self.fd, "KVM_GET_IRQCHIP", chip, f"chip {chip_id}")
        return chip

    def set_irqchip(self, chip: Any) -> None:
        """KVM_SET_IRQCHIP."""
        ioctl(self.fd, "KVM_SET_IRQCHIP", chip, f"chip {chip.chip_id}")

    def get_pit2(self) -> Any:
        """KVM_GET_PIT2: the in-kernel PIT's channel state."""
        pit = ffi.new("struct kvm_pit_state2 *")
        ioctl(self.fd, "KVM_GET_PIT2", pit)
        return pit

    def set_pit2(self, pit: Any) -> None:
        """KVM_SET_PIT2."""
        ioctl(self.fd, "KVM_SET_PIT2", pit)

    def get_clock(self) -> Any:
        """KVM_GET_CLOCK: the kvmclock value (ns) and, with flags, host realtime/TSC."""
        c = ffi.new("struct kvm_clock_data *")
        ioctl(self.fd, "KVM_GET_CLOCK", c)
        return c

    def set_clock(self, clock: int | Any) -> None:
        """KVM_SET_CLOCK."""
        if isinstance(clock, int):
            value, clock = clock, ffi.new("struct kvm_clock_data *")
            clock.clock = value
        ioctl(self.fd, "KVM_SET_CLOCK", clock)

    def set_msr_filter(self, ranges: list[tuple[int, int, int, bytes]], *, default_allow: bool = True) -> None:
        """KVM_X86_SET_MSR_FILTER: `ranges` of (flags, base, nmsrs, bitmap); a 0 bit denies.

        Denied accesses exit to userspace as KVM_EXIT_X86_RDMSR/WRMSR once
        KVM_CAP_X86_USER_SPACE_MSR is enabled with KVM_MSR_EXIT_REASON_FILTER.
        """
        f = ffi.new("struct kvm_msr_filter *")
        f.flags = lib.KVM_MSR_FILTER_DEFAULT_ALLOW if default_allow else lib.KVM_MSR_FILTER_DEFAULT_DENY
        keep = []
        for r, (flags, base, nmsrs, bitmap) in zip(f.ranges, ranges):
            buf = ffi.new("__u8[]", bitmap)
            keep.append(buf)
            r.flags, r.base, r.nmsrs, r.bitmap = flags, base, nmsrs, buf
        ioctl(self.fd, "KVM_X86_SET_MSR_FILTER", f)

    # -- saved state -------------------------------------------------------------

    def snapshot_state(self) -> dict[str, Any]:
        """The in-kernel devices and the clock, JSON-able: PIC master/slave, IOAPIC, PIT2 (if created), kvmclock."""
        s: dict[str, Any] = {
            "irqchip": {name: to_blob(self.get_irqchip(chip)) for name, chip in IRQCHIPS.items()},
            "clock": self.get_clock().clock,
        }
        if self.has_pit:
            s["pit2"] = to_blob(self.get_pit2())
        return s

    def restore_state(self, s: dict[str, Any]) -> None:
        """Load a `snapshot_state()`; a PIT in one and not the other is refused."""
        if ("pit2" in s) != self.has_pit:
            raise SnapshotError(f"the saved VM {'has' if 'pit2' in s else 'has no'} PIT; this VM "
                                f"{'has' if self.has_pit else 'has none'}")
        for name in IRQCHIPS:
            self.set_irqchip(from_blob("irqchip", s["irqchip"][name]))
        if self.has_pit:
            self.set_pit2(from_blob("pit2", s["pit2"]))
        self.set_clock(int(s["clock"]))

    def get_stats_fd(self) -> int:
        """KVM_GET_STATS_FD: a file of the VM's binary statistics (caller owns the fd)."""
        return ioctl_int(self.fd, "KVM_GET_STATS_FD")

    def create_vcpu(self, vcpu_id: int | None = None) -> Vcpu:
        """KVM_CREATE_VCPU, and map its kvm_run area."""
        if vcpu_id is None:
            vcpu_id = len(self.vcpus)
        try:
            fd = ioctl_int(self.fd, "KVM_CREATE_VCPU", vcpu_id, f"vcpu {vcpu_id}")
        except KvmIoctlError as e:
            if e.errno == errno.EEXIST:
                raise KvmError(f"vcpu {vcpu_id} already exists in this VM") from e
            raise
        vcpu = Vcpu(self, vcpu_id, fd, self.vcpu_mmap_size)
        self.vcpus.append(vcpu)
        if self.dirty_ring_entries:
            vcpu.map_dirty_ring(self.dirty_ring_entries)
        return vcpu

    # -- lifetime --------------------------------------------------------------

    def close(self) -> None:
        """Close every vCPU, then the VM. Guest memory stays with its owner."""
        if self.dirty_tracker is not None:
            for r in self.dirty_tracker.regions:
                r.dirty_log = False  # the memory may go to another VM
            self.dirty_tracker = None
        self.last_checkpoint = None
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Vm(fd={self.fd}, vcpus={len(self.vcpus)})"
