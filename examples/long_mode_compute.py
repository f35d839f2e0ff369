"""A 64-bit guest computes a CRC-32 of a buffer in its memory; the host checks it.

This shows the three things almost every guest needs from the VMM:
- memory the host fills before the guest runs (the input buffer),
- a CPU mode set up by the VMM (64-bit long mode: GDT, identity-mapped page
  tables and control registers written by `kvmpy.x86.modes.setup_long_mode`),
- a way to hand a result back (an `out` to a port, one exit).

The CRC is the one zlib computes (reflected polynomial 0xEDB88320), bit by
bit, so the guest needs no tables and no SSE4.2.

    .venv/bin/python examples/long_mode_compute.py
"""

from __future__ import annotations

import zlib

import kvmpy
from kvmpy.stats.accounting import ExitAccounting
from kvmpy.x86 import modes
from kvmpy.x86.asm import assemble

ENTRY = 0x10000  # above the tables setup_long_mode writes (GDT, IDT, page tables)
BUFFER = 0x200000  # the input, at 2 MiB
DATA = b"kvmpy: a thin hypervisor in Python on Linux KVM. " * 4
RESULT_PORT = 0x10

# RSI = buffer, RCX = length (set by the host through the registers).
GUEST = f"""
    mov $0xffffffff, %eax       # crc = ~0
byte:
    xorb (%rsi), %al            # crc ^= *p++
    inc %rsi
    mov $8, %edx
bit:
    shr $1, %eax                # crc = (crc >> 1) ^ (0xEDB88320 if the bit shifted out was 1)
    jnc nobit
    xor $0xedb88320, %eax
nobit:
    dec %edx
    jnz bit
    loop byte
    not %eax                    # crc = ~crc
    out %eax, ${RESULT_PORT:#x}
    hlt
"""


class ResultPort:
    def __init__(self) -> None:
        self.values: list[int] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.values.append(value)


def main() -> None:
    with kvmpy.Kvm() as kvm, kvm.create_vm() as vm, kvmpy.GuestMemory("4M") as mem:
        vm.add_memory(mem)
        mem.write(ENTRY, assemble(GUEST, mode="64", origin=ENTRY))
        mem.write(BUFFER, DATA)

        vcpu = vm.create_vcpu()
        # Long mode with the first 4 GiB identity-mapped; the program's inputs in RSI and RCX.
        modes.setup_long_mode(vcpu, mem, ENTRY, regs={"rsi": BUFFER, "rcx": len(DATA)})

        port = ResultPort()
        pio = kvmpy.pio_bus()
        pio.register(RESULT_PORT, 4, port, "result")
        loop = kvmpy.VcpuLoop(vcpu, pio, kvmpy.mmio_bus(), accounting=ExitAccounting(vcpu.id))
        exit = loop.run()

        guest_crc = port.values[0]
        host_crc = zlib.crc32(DATA)
        print(f"guest mode: {vcpu.cpu_mode()}, stopped with {exit.name}")
        print(f"CRC-32 of {len(DATA)} bytes: guest {guest_crc:#010x}, host {host_crc:#010x}")
        print("match" if guest_crc == host_crc else "MISMATCH")
        print(f"exits: {sum(loop.accounting.exits.values())}")
        if guest_crc != host_crc:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
