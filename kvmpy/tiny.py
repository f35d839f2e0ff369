"""Tiny guests: VM + memory + one vCPU + buses, for experiments, tests and `kvmpy lab`.

`tiny_guest(kvm, mode, source)` assembles `source` for CPU mode "16", "32"
or "64", loads it, puts the vCPU in that mode and returns a `Guest` whose
`run()` drives a `VcpuLoop`. Closing the guest (or leaving its `with`
block) closes the VM and frees the memory, whatever the test did.

Memory layout, the same in every mode:

    0x00000-0x9ffff  RAM (IVT/IDT, GDT, page tables, stacks, code)
    0xa0000-0xfffff  no memory slot: the PC's legacy hole, so an access
                     here is an MMIO exit even in real mode
    0x100000-4 MiB   RAM

Code starts at 0x7c00 in real mode and at 0x10000 otherwise (the IDT lives
at 0x1000). An IDT entry is given as {vector: offset of the handler from
the code's start}; sources place handlers with `.org OFFSET`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .assists import Assists
from .bus import Bus, mmio_bus, pio_bus
from .exits import Exit
from .kvm import Kvm
from .memory import GuestMemory, MemoryRegion
from .runloop import Handler, VcpuLoop
from .stats.accounting import ExitAccounting
from .vcpu import Vcpu
from .vm import Vm
from .x86 import modes
from .x86.asm import assemble

REAL_MODE_ENTRY = 0x7C00
ENTRY = 0x10000
LOW_RAM_END = 0xA0000
HIGH_RAM_START = 0x100000
MMIO_HOLE = 0xD0000  # inside the legacy hole; reachable from every mode
RAM_SIZE = 4 << 20


def entry_for(mode: str) -> int:
    """Where `tiny_guest` loads the code for `mode`."""
    return REAL_MODE_ENTRY if mode == "16" else ENTRY


class RecordingPort:
    """A port (or MMIO) device that records every access.

    Writes are appended to `writes` as (offset, size, value); reads answer
    from `reads` in order (then 0) and are recorded in `read_offsets`.
    `on_write(offset, size, value)` runs after a write is recorded.
    """

    def __init__(self, reads: list[int] | None = None,
                 on_write: Callable[[int, int, int], None] | None = None) -> None:
        self.reads = list(reads or [])
        self.on_write = on_write
        self.writes: list[tuple[int, int, int]] = []
        self.read_offsets: list[tuple[int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.read_offsets.append((offset, size))
        return self.reads.pop(0) if self.reads else 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))
        if self.on_write is not None:
            self.on_write(offset, size, value)

    def values(self, offset: int | None = None) -> list[int]:
        """The values written (at `offset`, when given), in order."""
        return [v for o, _, v in self.writes if offset is None or o == offset]


@dataclass
class Guest:
    """A running-ready tiny VM. `port` records I/O on ports `port_base`..+16."""

    vm: Vm
    mem: GuestMemory
    vcpu: Vcpu
    mode: str
    entry: int
    code: bytes
    pio: Bus
    mmio: Bus
    port: RecordingPort
    port_base: int
    regions: dict[str, MemoryRegion] = field(default_factory=dict)
    loop: VcpuLoop | None = None
    assists: Assists | None = None

    def make_loop(self, handlers: Mapping[int, Handler] | None = None, *, assists: Assists | None = None,
                  accounting: ExitAccounting | None = None) -> VcpuLoop:
        """A loop as a machine has it: exit accounting, and instruction completion behind `handlers`."""
        self.loop = VcpuLoop(self.vcpu, self.pio, self.mmio, handlers=dict(handlers or {}),
                             accounting=accounting if accounting is not None else ExitAccounting(self.vcpu.id))
        self.assists = assists if assists is not None else Assists()
        self.assists.attach(self.loop)
        return self.loop

    def run(self, handlers: Mapping[int, Handler] | None = None, **kwargs: Any) -> Exit:
        """Run the vCPU until the loop returns; returns the exit that ended it."""
        loop = self.loop if self.loop is not None and not handlers and not kwargs \
            else self.make_loop(handlers, **kwargs)
        return loop.run()

    def close(self) -> None:
        self.vm.close()
        self.mem.close()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_ivt(mem: GuestMemory, idt: Mapping[int, int]) -> None:
    # Real mode: the interrupt vector table at 0, four bytes (offset, segment) a vector.
    for vector, addr in idt.items():
        mem.write(vector * 4, struct.pack("<HH", addr & 0xF, addr >> 4))


def tiny_guest(kvm: Kvm, mode: str, source: str, *, idt: Mapping[int, int] | None = None,
               irqchip: bool = False, port_base: int = 0x10, extra_regions: Mapping[str, dict] | None = None,
               stack: int = 0x7000, setup_memory: Callable[[GuestMemory], None] | None = None,
               vcpu_id: int | None = None, dirty_ring: int = 0) -> Guest:
    """Build a one-vCPU guest running `source` in `mode` ("16", "32" or "64").

    `extra_regions` = {name: GuestMemory.add_region keyword arguments} adds
    slots (e.g. read-only or dirty-logged ones) before KVM sees the memory;
    `setup_memory(mem)` runs after the mode's tables are written and before
    the first KVM_RUN (to edit page tables, preload data, ...). `dirty_ring`
    entries per vCPU enable the dirty ring before the vCPU exists.
    """
    entry = entry_for(mode)
    code = assemble(source, mode, entry)
    vm = kvm.create_vm()
    mem = GuestMemory(0)
    try:
        mem.add_region(0, LOW_RAM_END)
        mem.add_region(HIGH_RAM_START, RAM_SIZE - HIGH_RAM_START)
        regions = {name: mem.add_region(**kw) for name, kw in (extra_regions or {}).items()}
        if irqchip:
            vm.create_irqchip()
        vm.add_memory(mem)
        mem.write(entry, code)
        if dirty_ring:
            vm.enable_dirty_ring(dirty_ring)
        vcpu = vm.create_vcpu(vcpu_id)
        # On a hardware host the guest sees only the CPUID table it is given.
        vcpu.set_cpuid2(kvm.get_supported_cpuid())
        handlers = {v: entry + off for v, off in (idt or {}).items()}
        if mode == "16":
            write_ivt(mem, handlers)
            modes.setup_real_mode(vcpu, entry, stack=stack)
        elif mode == "32":
            modes.setup_protected_mode(vcpu, mem, entry, stack=stack, idt=handlers or None)
        elif mode == "64":
            modes.setup_long_mode(vcpu, mem, entry, stack=stack, idt=handlers or None)
        else:
            raise ValueError(f"mode must be '16', '32' or '64', not {mode!r}")
        if setup_memory is not None:
            setup_memory(mem)
        pio, mmio = pio_bus(), mmio_bus()
        port = RecordingPort()
        pio.register(port_base, 16, port, "recording port")
        return Guest(vm, mem, vcpu, mode, entry, code, pio, mmio, port, port_base, regions)
    except BaseException:
        vm.close()
        mem.close()
        raise


def add_vcpu(guest: Guest, source: str, *, stack: int, origin: int) -> tuple[Vcpu, bytes]:
    """A further long-mode vCPU of `guest` running `source` assembled at `origin`."""
    code = assemble(source, "64", origin)
    guest.mem.write(origin, code)
    vcpu = guest.vm.create_vcpu()
    vcpu.set_cpuid2(guest.vm.system.get_supported_cpuid())
    modes.setup_long_mode(vcpu, guest.mem, origin, stack=stack)
    return vcpu, code
