"""What a PC BIOS leaves behind, for kernels kvmpy starts without one.

Linux, started at its 64-bit or PVH entry, sets up the interrupt
controllers itself and never returns to real mode. A multiboot kernel
started by GRUB or by QEMU's SeaBIOS may: kvm-unit-tests' `realmode` runs
real-mode code that enables interrupts and expects what the BIOS set up.
So for multiboot kernels kvmpy leaves two things as a BIOS would:

- the 8259 vector bases of the PC: master 0x08 (IRQ 0-7 -> vectors 8-15),
  slave 0x70 (IRQ 8-15 -> 0x70-0x77). KVM creates both PICs with base 0,
  so an IRQ would arrive on a CPU exception vector;
- a real-mode IVT at 0 whose vectors point to default handlers in the BIOS
  area, so an interrupt nobody installed a handler for returns at once
  instead of jumping to address 0 (kvmtool's BIOS does the same): an
  `iret` for most, and for the 16 IRQ vectors an end-of-interrupt to the
  8259(s) first, as a BIOS's default IRQ handlers do (else the IRQ's
  in-service bit would block it and every lower-priority one).

The BSP's LINT0 is already ExtINT (virtual wire mode): KVM sets it when it
resets the boot vCPU's LAPIC.
"""

from __future__ import annotations

import struct
from typing import Any

from ..memory import GuestMemory

PIC_MASTER, PIC_SLAVE = 0, 1  # KVM_GET_IRQCHIP chip ids
BIOS_PIC_BASES = {PIC_MASTER: 0x08, PIC_SLAVE: 0x70}

IVT_ADDR = 0
IVT_SIZE = 256 * 4
BIOS_SEGMENT = 0xF000  # the BIOS area (reserved in e820)
# Real-mode machine code, at F000:0000, F000:0010 and F000:0020.
IRET_STUB = 0xF0000
_IRET = bytes.fromhex("cf")                          # iret
MASTER_EOI_STUB = 0xF0010
_MASTER_EOI = bytes.fromhex("50 b020 e620 58 cf")    # push ax; mov al,0x20; out 0x20,al; pop ax; iret
SLAVE_EOI_STUB = 0xF0020
_SLAVE_EOI = bytes.fromhex("50 b020 e6a0 e620 58 cf")  # ... out 0xa0,al; out 0x20,al ...


def set_bios_pic_bases(vm: Any) -> None:
    """Give both in-kernel 8259s the vector bases a PC BIOS programs (KVM_SET_IRQCHIP)."""
    for chip_id, base in BIOS_PIC_BASES.items():
        chip = vm.get_irqchip(chip_id)
        chip.chip.pic.irq_base = base
        vm.set_irqchip(chip)


def write_real_mode_ivt(mem: GuestMemory) -> None:
    """A real-mode IVT of default handlers: EOI + `iret` for the IRQ vectors, `iret` for the rest."""
    for addr, code in ((IRET_STUB, _IRET), (MASTER_EOI_STUB, _MASTER_EOI), (SLAVE_EOI_STUB, _SLAVE_EOI)):
        mem.write(addr, code)
    master, slave = BIOS_PIC_BASES[PIC_MASTER], BIOS_PIC_BASES[PIC_SLAVE]
    handlers = [IRET_STUB] * 256
    handlers[master:master + 8] = [MASTER_EOI_STUB] * 8
    handlers[slave:slave + 8] = [SLAVE_EOI_STUB] * 8
    mem.write(IVT_ADDR, b"".join(struct.pack("<HH", h - (BIOS_SEGMENT << 4), BIOS_SEGMENT) for h in handlers))


def leave_bios_state(vm: Any, mem: GuestMemory) -> None:
    """Both of the above: what a multiboot kernel finds after a BIOS."""
    set_bios_pic_bases(vm)
    write_real_mode_ivt(mem)


__all__ = ["BIOS_PIC_BASES", "IRET_STUB", "IVT_ADDR", "IVT_SIZE", "MASTER_EOI_STUB", "SLAVE_EOI_STUB",
           "leave_bios_state", "set_bios_pic_bases", "write_real_mode_ivt"]
