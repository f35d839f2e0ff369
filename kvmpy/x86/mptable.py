"""Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its CPUs.

Writes the MP floating pointer structure and the MP configuration table
(spec chapter 4, "MP Configuration Table") into guest memory: one processor
entry per vCPU, an ISA bus, the I/O APIC, the ISA interrupt assignments and
the local interrupts. Linux reads it in arch/x86/kernel/mpparse.c
(smp_scan_config looks for "_MP_" in the last KiB of base memory, 639 KiB,
which is where the default base puts it).

There is no system header for these structures (Linux keeps them in the
kernel-internal asm/mpspec_def.h), so each is packed with `struct` from the
spec's field tables, named below.

ISA interrupt routing: ISA IRQ n goes to I/O APIC pin n, for all 16 IRQs,
including IRQ0 (the PIT) to pin 0. That is what KVM's default GSI routing
does (virt/kvm/irqchip.c / kvm_setup_default_irq_routing: GSI n -> PIC pin
n%8 and IOAPIC pin n, for n < 16) and the in-kernel PIT raises GSI 0. A PC
BIOS or QEMU (which installs its own routing, GSI 0 -> pin 2) would route
IRQ0 to pin 2; with KVM's default routing that pin never fires, and Linux's
check_timer would have to fall back. Firecracker's MP table makes the same
identity choice for the same reason.
"""

from __future__ import annotations

import struct

from ..errors import BootError
from ..memory import GuestMemory

MPTABLE_BASE = 0x9FC00  # the EBDA: the last KiB of base memory
MPTABLE_LIMIT = 0xA0000  # end of the EBDA; the whole table must fit below it
IOAPIC_DEFAULT_ADDR = 0xFEC00000
LAPIC_DEFAULT_ADDR = 0xFEE00000

MP_SPEC_REV = 4  # MP spec 1.4
OEM_ID = b"KVMPY"
PRODUCT_ID = b"KVMPY"

# Entry types (spec table 4-3).
MP_PROCESSOR = 0
MP_BUS = 1
MP_IOAPIC = 2
MP_INTSRC = 3
MP_LINTSRC = 4

# Processor entry CPU flags.
CPU_ENABLED = 1 << 0
CPU_BOOTPROCESSOR = 1 << 1
# LAPIC version KVM's in-kernel local APIC reports (APIC_VERSION 0x14) and the
# I/O APIC version register of KVM's I/O APIC (0x11, an 82093AA).
LAPIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
MPC_APIC_USABLE = 1 << 0
# CPU signature: family 6, model 0, stepping 0; features FPU (bit 0) and APIC
# (bit 9), the CPUID.1:EDX bits the spec asks for in this field.
CPU_SIGNATURE = 6 << 8
CPU_FEATURES = (1 << 0) | (1 << 9)

# Interrupt types (spec table 4-10).
MP_INT = 0
MP_NMI = 1
MP_EXTINT = 3
MP_IRQ_DEFAULT = 0  # polarity/trigger "conforms to the bus" (ISA: high, edge)

ISA_BUS_ID = 0
ISA_BUS_TYPE = b"ISA   "
ISA_IRQS = 16
ALL_LAPICS = 0xFF
MAX_APIC_ID = 0xFE  # 0xFF is the broadcast ID

# Floating pointer (spec 4.1, table 4-1): signature, physical address pointer,
# length in 16-byte units, spec rev, checksum, feature bytes 1-5.
_MPF = struct.Struct("<4sIBBBBBBBB")
# Configuration table header (4.2, table 4-2): signature, base table length,
# spec rev, checksum, OEM ID, product ID, OEM table pointer, OEM table size,
# entry count, local APIC address, extended table length, extended checksum,
# reserved.
_MPC = struct.Struct("<4sHBB8s12sIHHIHBB")
# Processor entry (4.3.1): type, local APIC id, version, CPU flags, signature,
# feature flags, 8 reserved bytes.
_CPU = struct.Struct("<BBBBII8x")
# Bus entry (4.3.2): type, bus id, type string.
_BUS = struct.Struct("<BB6s")
# I/O APIC entry (4.3.3): type, id, version, flags, address.
_IOAPIC = struct.Struct("<BBBBI")
# I/O interrupt assignment (4.3.4) and local interrupt assignment (4.3.5):
# type, interrupt type, flags, source bus id, source bus irq, destination
# (I/O APIC id / local APIC id), destination pin (INTIN# / LINTIN#).
_INTSRC = struct.Struct("<BBHBBBB")

assert (_MPF.size, _MPC.size, _CPU.size, _BUS.size, _IOAPIC.size, _INTSRC.size) == \
    (16, 44, 20, 8, 8, 8)


def mptable_size(ncpus: int) -> int:
    """Bytes the floating pointer plus configuration table take for `ncpus` CPUs."""
    return (_MPF.size + _MPC.size + ncpus * _CPU.size + _BUS.size + _IOAPIC.size
            + ISA_IRQS * _INTSRC.size + 2 * _INTSRC.size)


def max_cpus(base: int = MPTABLE_BASE, limit: int = MPTABLE_LIMIT) -> int:
    """The most CPUs whose table fits in [base, limit)."""
    return min((limit - base - mptable_size(0)) // _CPU.size, MAX_APIC_ID)


def _checksum(data: bytes) -> int:
    """The byte that makes `data` (with a 0 in its checksum field) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def write_mptable(mem: GuestMemory, ncpus: int, *, base: int = MPTABLE_BASE,
                  ioapic_addr: int = IOAPIC_DEFAULT_ADDR, ioapic_id: int | None = None,
                  lapic_addr: int = LAPIC_DEFAULT_ADDR, limit: int = MPTABLE_LIMIT) -> int:
    """Write the MP floating pointer at `base` and the configuration table after it.

    APIC IDs are 0..ncpus-1 (cpu 0 is the boot processor), the I/O APIC gets
    `ioapic_id` (default: ncpus, the first free ID). Returns the bytes used.
    Raises BootError when the table would not fit below `limit`.
    """
    if ncpus < 1:
        raise BootError(f"MP table for {ncpus} CPUs: need at least one")
    if ioapic_id is None:
        ioapic_id = ncpus
    most = max_cpus(base, limit)
    if ncpus > most:
        raise BootError(
            f"MP table for {ncpus} CPUs needs {mptable_size(ncpus)} bytes at {base:#x}, "
            f"more than the {limit - base} below {limit:#x}: at most {most} CPUs")
    if not 0 <= ioapic_id <= MAX_APIC_ID or ioapic_id < ncpus:
        raise BootError(
            f"I/O APIC id {ioapic_id} collides with a CPU's APIC id (0..{ncpus - 1}) or is "
            f"above {MAX_APIC_ID}")
    if base % 16:
        raise BootError(f"MP floating pointer at {base:#x} must be 16-byte aligned")

    entries = bytearray()
    for cpu in range(ncpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries += _CPU.pack(MP_PROCESSOR, cpu, LAPIC_VERSION, flags, CPU_SIGNATURE,
                             CPU_FEATURES)
    entries += _BUS.pack(MP_BUS, ISA_BUS_ID, ISA_BUS_TYPE)
    entries += _IOAPIC.pack(MP_IOAPIC, ioapic_id, IOAPIC_VERSION, MPC_APIC_USABLE, ioapic_addr)
    for irq in range(ISA_IRQS):
        # Identity: ISA IRQ n -> I/O APIC pin n, as KVM's default GSI routing (module doc).
        entries += _INTSRC.pack(MP_INTSRC, MP_INT, MP_IRQ_DEFAULT, ISA_BUS_ID, irq, ioapic_id, irq)
    # Virtual wire: the 8259's output on every LAPIC's LINT0, NMI on LINT1.
    entries += _INTSRC.pack(MP_LINTSRC, MP_EXTINT, MP_IRQ_DEFAULT, ISA_BUS_ID, 0, ALL_LAPICS, 0)
    entries += _INTSRC.pack(MP_LINTSRC, MP_NMI, MP_IRQ_DEFAULT, ISA_BUS_ID, 0, ALL_LAPICS, 1)
    count = ncpus + 1 + 1 + ISA_IRQS + 2

    table_addr = base + _MPF.size
    length = _MPC.size + len(entries)
    header = _MPC.pack(b"PCMP", length, MP_SPEC_REV, 0, OEM_ID.ljust(8), PRODUCT_ID.ljust(12),
                       0, 0, count, lapic_addr, 0, 0, 0)
    table = bytearray(header + entries)
    table[7] = _checksum(bytes(table))  # checksum field: offset 7 of table 4-2

    # feature1 = 0: a configuration table is present; feature2 = 0: virtual
    # wire mode (no IMCR), matching the ExtINT on LINT0 above.
    mpf = bytearray(_MPF.pack(b"_MP_", table_addr, 1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0))
    mpf[10] = _checksum(bytes(mpf))  # checksum field: offset 10 of table 4-1

    mem.write(base, bytes(mpf))
    mem.write(table_addr, bytes(table))
    return len(mpf) + len(table)
