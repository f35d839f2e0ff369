"""What a VM exit costs, and where it is handled: three guests, measured with kvmpy.stats.

Each guest writes N times and halts. The three differ only in where the
write goes:

- `out` to a port the VMM emulates: every write is a KVM_EXIT_IO that
  KVM_RUN returns to kvmpy, which hands it to a device and re-enters;
- a store to guest-physical memory with no memory slot: every write is a
  KVM_EXIT_MMIO (on VT-x/AMD-V an EPT/NPT violation whose instruction KVM
  must decode first);
- `out` to a port bound to an ioeventfd: KVM completes the write in the
  kernel and signals an eventfd, and kvmpy sees no exit at all (this is
  how virtio queue notifications reach an I/O thread).

`measure(loop)` gives kvmpy's own accounting (exits by reason, time in the
guest and in the VMM) and the deltas of KVM's counters from the vCPU's
stats fd, side by side.

    .venv/bin/python examples/exit_stats.py [N]
"""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.table import Table

import kvmpy
from kvmpy.platform import detect_backend
from kvmpy.stats.accounting import ExitAccounting
from kvmpy.stats.api import measure
from kvmpy.x86 import modes
from kvmpy.x86.asm import assemble

ENTRY = 0x7C00
PORT, EVENTFD_PORT, MMIO_ADDR = 0x80, 0x84, 0xD0000  # MMIO_ADDR: in the hole below 1 MiB, no slot


def guest(write: str) -> bytes:
    """Real mode: `write` CX times, then hlt."""
    return assemble(f"""
        mov $0xd000, %ax
        mov %ax, %ds            # DS:0 = MMIO_ADDR
    1:  {write}
        loop 1b
        hlt
    """, "16", ENTRY)


GUESTS = {
    "port (kvmpy)": f"out %al, ${PORT:#x}",
    "MMIO (kvmpy)": "movb %al, 0",
    "port (ioeventfd)": f"out %al, ${EVENTFD_PORT:#x}",
}


class Sink:
    """A device that accepts every write."""

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def run(kvm: kvmpy.Kvm, code: bytes, count: int):
    with kvm.create_vm() as vm, kvmpy.GuestMemory(0) as mem:
        mem.add_region(0, 0xA0000)  # low RAM only: 0xd0000 has no slot
        vm.add_memory(mem)
        mem.write(ENTRY, code)
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            vm.ioeventfd(efd, EVENTFD_PORT, 1, pio=True)
            with vm.create_vcpu(0) as vcpu:
                modes.setup_real_mode(vcpu, ENTRY)
                regs = vcpu.get_regs()
                regs.rcx = count
                vcpu.set_regs(regs)
                pio, mmio = kvmpy.pio_bus(), kvmpy.mmio_bus()
                pio.register(PORT, 1, Sink(), "sink")
                mmio.register(MMIO_ADDR, 0x1000, Sink(), "sink")
                loop = kvmpy.VcpuLoop(vcpu, pio, mmio, accounting=ExitAccounting(vcpu.id))
                with measure(loop) as m:
                    exit = loop.run()
                assert isinstance(exit, kvmpy.HltExit), exit
            try:
                signalled = os.eventfd_read(efd)  # KVM adds 1 per write it completed in the kernel
            except BlockingIOError:
                signalled = 0
        finally:
            os.close(efd)
    return m.result, signalled


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    table = Table(title=f"{count} guest writes each, then hlt (backend: {detect_backend().value})")
    for col in ("guest writes to", "exits to kvmpy", "KVM exits", "KVM io_exits", "KVM mmio_exits",
                "eventfd", "us/write", "us in kvmpy"):
        table.add_column(col, justify="left" if col == "guest writes to" else "right")
    per_write = {}
    with kvmpy.Kvm() as kvm:
        for name, write in GUESTS.items():
            r, signalled = run(kvm, guest(write), count)
            per_write[name] = r.seconds * 1e6 / count
            table.add_row(name, str(r.total_exits - r.exits["HLT"]), str(r.kvm.get("exits", "-")),
                          str(r.kvm.get("io_exits", "-")), str(r.kvm.get("mmio_exits", "-")), str(signalled),
                          f"{per_write[name]:.2f}", f"{r.vmm_ns / 1e3 / count:.2f}")
    console = Console() if sys.stdout.isatty() else Console(width=120)
    console.print(table)
    ratio = per_write["port (kvmpy)"] / per_write["port (ioeventfd)"]
    console.print(f"a write completed in the kernel (ioeventfd) is {ratio:.1f}x cheaper than one "
                  "that exits to kvmpy")


if __name__ == "__main__":
    main()
