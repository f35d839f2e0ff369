"""A C function runs in a sandboxed micro-VM: no Linux, guest user mode, a fresh VM per call.

The function computes the Adler-32 of a buffer the
host passes in (a bytes argument arrives as a pointer into guest memory) and
prints a line to the host through the host-call ABI. The host checks the
checksum against zlib, then shows what a fault and a runaway loop become.

    .venv/bin/python examples/guest_function.py
"""

from __future__ import annotations

import zlib

from kvmpy.sandbox import BudgetExceeded, GuestFault, GuestFunction

ADLER32 = r"""
#include <kvmpy_guest.h>

long guest_main(const unsigned char *data, long length) {
    uint64_t a = 1, b = 0;
    for (long i = 0; i < length; i++) {
        a = (a + data[i]) % 65521;
        b = (b + a) % 65521;
    }
    kvmpy_write("adler32 computed in the guest\n", 30);
    return (long)((b << 16) | a);
}
"""


def main() -> None:
    adler = GuestFunction(ADLER32, memory="16M", timeout=5.0)  # compiled once
    data = b"kvmpy runs this function in its own VM. " * 1000
    result = adler.run(data, len(data))                         # one VM: created, run, destroyed
    print(result.output.decode(), end="")
    print(f"guest {result.value:#010x}, zlib {zlib.adler32(data):#010x}")
    print("match" if result.value == zlib.adler32(data) else "MISMATCH")
    print(f"one call (VM create -> run -> result -> destroy): {result.elapsed * 1e3:.1f} ms")

    crash = GuestFunction("long guest_main(long *p) { return *p; }")
    try:
        crash(0)
    except GuestFault as e:
        print(f"fault: vector {e.vector}, cr2 {e.cr2:#x}")

    spin = GuestFunction("long guest_main(void) { for (;;) ; }", timeout=0.2)
    try:
        spin()
    except BudgetExceeded:
        print("runaway guest stopped by its 0.2 s budget")


if __name__ == "__main__":
    main()
