"""Three ways a VMM interrupts its guest: an IRQ line, an MSI and an irqfd.

With KVM_CREATE_IRQCHIP the interrupt controllers live in the kernel: a
LAPIC per vCPU, an IOAPIC at 0xfec00000 and the two 8259 PICs. The host
only says "raise this line" (KVM_IRQ_LINE), "deliver this message"
(KVM_SIGNAL_MSI) or writes an eventfd bound to a line (KVM_IRQFD: no
ioctl per interrupt at all, which is how virtio devices notify guests).

The guest masks the PICs, routes IOAPIC pins 4 and 6 to vectors 0x30 and
0x31, enables its LAPIC, says "ready" on port 0x10 and halts. An in-kernel
LAPIC makes `hlt` wait inside KVM, so the host injects from the port device
the guest writes to: each handler reports its vector on port 0x14, and the
host answers with the next interrupt.

    .venv/bin/python examples/interrupts.py
"""

from __future__ import annotations

import os

import kvmpy
from kvmpy.x86 import modes
from kvmpy.x86.asm import assemble

ENTRY = 0x10000
IOAPIC, LAPIC = 0xFEC00000, 0xFEE00000
IRQ_PIN, IRQFD_PIN = 4, 6
IRQ_VECTOR, IRQFD_VECTOR, MSI_VECTOR = 0x30, 0x31, 0x40


def handler(vector: int) -> str:
    return f"""
        mov ${vector:#x}, %eax
        out %eax, $0x14         # tell the host which handler ran
        movl $0, 0xb0(%rsi)     # LAPIC end of interrupt
        iretq
    """


def route(pin: int, vector: int) -> str:
    # IOAPIC: select redirection entry `pin` (two 32-bit halves), write vector / destination 0.
    return f"""
        movl ${0x10 + 2 * pin:#x}, (%rbx)
        movl ${vector:#x}, 0x10(%rbx)
        movl ${0x11 + 2 * pin:#x}, (%rbx)
        movl $0, 0x10(%rbx)
    """


GUEST = f"""
    mov $0xff, %al
    out %al, $0x21              # mask both 8259 PICs: we use the IOAPIC
    out %al, $0xa1
    mov ${IOAPIC:#x}, %ebx
    mov ${LAPIC:#x}, %esi
    {route(IRQ_PIN, IRQ_VECTOR)}
    {route(IRQFD_PIN, IRQFD_VECTOR)}
    movl $0x1ff, 0xf0(%rsi)     # LAPIC spurious-interrupt register: software enable
    sti
    out %al, $0x10              # ready
1:  hlt
    jmp 1b
.org 0x100
{handler(IRQ_VECTOR)}
.org 0x200
{handler(MSI_VECTOR)}
.org 0x300
{handler(IRQFD_VECTOR)}
"""


class Conductor:
    """The port device that drives the demo: each report triggers the next interrupt."""

    def __init__(self, vm: kvmpy.Vm, eventfd: int) -> None:
        self.vm = vm
        self.eventfd = eventfd
        self.loop: kvmpy.VcpuLoop | None = None
        self.seen: list[int] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:  # port 0x10: the guest is ready
            print(f"host: raising IRQ line {IRQ_PIN} (KVM_IRQ_LINE)")
            self.vm.irq_line(IRQ_PIN, 1)
            self.vm.irq_line(IRQ_PIN, 0)
            return
        self.seen.append(value)
        print(f"guest: handler for vector {value:#x} ran")
        if value == IRQ_VECTOR:
            print(f"host: sending an MSI for vector {MSI_VECTOR:#x} (KVM_SIGNAL_MSI)")
            self.vm.signal_msi(LAPIC, MSI_VECTOR)
        elif value == MSI_VECTOR:
            print(f"host: writing the eventfd bound to GSI {IRQFD_PIN} (KVM_IRQFD)")
            os.eventfd_write(self.eventfd, 1)
        else:
            self.loop.stop()  # all three arrived


def main() -> None:
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with kvmpy.Kvm() as kvm, kvm.create_vm() as vm, kvmpy.GuestMemory("4M") as mem:
            vm.create_irqchip()  # before any vCPU exists
            vm.add_memory(mem)
            vm.irqfd(efd, IRQFD_PIN)
            mem.write(ENTRY, assemble(GUEST, mode="64", origin=ENTRY))
            vcpu = vm.create_vcpu()
            idt = {IRQ_VECTOR: ENTRY + 0x100, MSI_VECTOR: ENTRY + 0x200, IRQFD_VECTOR: ENTRY + 0x300}
            modes.setup_long_mode(vcpu, mem, ENTRY, idt=idt)

            conductor = Conductor(vm, efd)
            pio = kvmpy.pio_bus()
            pio.register(0x10, 8, conductor, "conductor")
            conductor.loop = kvmpy.VcpuLoop(vcpu, pio, kvmpy.mmio_bus())
            exit = conductor.loop.run()
            print(f"loop ended with {exit.name}; vectors seen: "
                  + ", ".join(f"{v:#x}" for v in conductor.seen))
    finally:
        os.close(efd)


if __name__ == "__main__":
    main()
