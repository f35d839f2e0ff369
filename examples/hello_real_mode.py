"""Hello world from a real-mode guest, printed through an I/O port.

The smallest useful VM: one memory slot, one vCPU in 16-bit real mode (where
every x86 CPU starts), and a "debug console" device on port 0xe9 (the port
Bochs and QEMU use for the same purpose). The guest writes its message one
byte at a time with `out`; each `out` exits to us, the exit loop hands the
byte to the device, and `hlt` ends the run.

    .venv/bin/python examples/hello_real_mode.py
"""

from __future__ import annotations

import kvmpy
from kvmpy.x86 import modes
from kvmpy.x86.asm import assemble

ENTRY = 0x7C00  # where a PC BIOS would load a boot sector

# The guest program, in GNU as (AT&T) syntax. `lodsb` loads the byte at DS:SI
# into AL and advances SI; a zero byte ends the string.
GUEST = """
    cld
    mov $message, %si
next:
    lodsb
    test %al, %al
    jz done
    out %al, $0xe9
    jmp next
done:
    hlt
message:
    .asciz "Hello from real mode!\\n"
"""


class DebugConsole:
    """A port device: every byte written is appended to `text`."""

    def __init__(self) -> None:
        self.text = bytearray()

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.text.append(value & 0xFF)


def main() -> None:
    # /dev/kvm -> a VM with 1 MiB of RAM (slot 0 at guest-physical 0).
    with kvmpy.Kvm() as kvm, kvm.create_vm() as vm, kvmpy.GuestMemory("1M") as mem:
        vm.add_memory(mem)
        mem.write(ENTRY, assemble(GUEST, mode="16", origin=ENTRY))

        # One vCPU, in real mode, about to execute at 0000:7c00.
        vcpu = vm.create_vcpu()
        modes.setup_real_mode(vcpu, ENTRY)

        # Devices sit on buses; the exit loop never needs to know what they are.
        console = DebugConsole()
        pio = kvmpy.pio_bus()
        pio.register(0xE9, 1, console, "debug console")

        # KVM_RUN until an exit the loop does not continue from: here the HLT.
        exit = kvmpy.VcpuLoop(vcpu, pio, kvmpy.mmio_bus()).run()

        print(console.text.decode(), end="")
        print(f"guest stopped with {exit.name} after {len(console.text)} port writes")


if __name__ == "__main__":
    main()
