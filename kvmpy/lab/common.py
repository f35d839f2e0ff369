"""Pieces every lab's guests share: the "done" signal, sink devices, timing helpers."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import KvmError
from ..exits import Exit, IntrExit
from ..kvm import Kvm
from ..tiny import MMIO_HOLE, Guest, tiny_guest
from ..x86 import modes

RUN_TIMEOUT = 60.0  # seconds a lab guest may run before the lab gives up on it (each takes well under 1 s)

DONE_PORT = 0xF4  # a guest at CPL0 says "finished" with `out %al, $0xf4`
DONE_MMIO = MMIO_HOLE  # ... and at CPL3 (where `out` faults) with a store here
FAULT_PORT = 0xF5  # an unexpected exception's handler reports its vector here
FAULTS = 0x8000  # the guest kernel's #GP handler counts the faults it skipped here
USER_STACK = 0x6000
KERNEL_STACK = 0x7000
GP_HANDLER = 0x400  # offset of the #GP handler in a `program`


class LabError(KvmError):
    """A lab's guest did not run as the lab planned, or a lab cannot run here (no matplotlib)."""


class Sink:
    """A device that accepts every access and counts them."""

    def __init__(self) -> None:
        self.writes = 0
        self.reads = 0

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1


class Done:
    """The end of a lab guest: its write stops the vCPU loop (the loop returns INTR)."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.value: int | None = None

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.value = value
        assert self.guest.loop is not None
        self.guest.loop.stop()


class UnexpectedFault:
    """Port FAULT_PORT: a guest handler for an exception the lab did not plan reports its vector."""

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        raise LabError(f"lab guest took unexpected exception vector {value}")


def wire_done(guest: Guest) -> Done:
    """Register the done port and MMIO page and the unexpected-fault port on a tiny guest."""
    done = Done(guest)
    guest.pio.register(DONE_PORT, 1, done, "lab done")
    guest.mmio.register(DONE_MMIO, 0x1000, done, "lab done")
    guest.pio.register(FAULT_PORT, 1, UnexpectedFault(), "lab fault report")
    return done


def run_loop(loop: Any, timeout: float = RUN_TIMEOUT) -> tuple[Exit, float]:
    """`loop.run()` with a watchdog that stops it after `timeout` s; (the exit that ended it, seconds)."""
    watchdog = threading.Timer(timeout, loop.stop)
    watchdog.daemon = True
    watchdog.start()
    t0 = time.perf_counter()
    try:
        exit = loop.run()
    finally:
        watchdog.cancel()
    return exit, time.perf_counter() - t0


def run_until_done(guest: Guest, done: Done, timeout: float = RUN_TIMEOUT) -> tuple[Exit, float]:
    """Run the guest's loop to its done write; (the exit that ended it, seconds)."""
    assert guest.loop is not None
    exit, seconds = run_loop(guest.loop, timeout)
    if done.value is None or not isinstance(exit, IntrExit):
        why = f"{timeout:g} s passed" if isinstance(exit, IntrExit) else f"it ended with {exit.name}"
        raise LabError(f"lab guest did not reach its done write: {why}, at rip {guest.vcpu.get_regs().rip:#x}")
    return exit, seconds


def unexpected_fault_handlers(vectors: Sequence[int] = (0, 6, 8, 13, 14)) -> str:
    """Assembly for IDT handlers that report an unplanned exception on FAULT_PORT; `.org` each."""
    return "".join(f"""
.org {0x800 + i * 0x20:#x}
    mov ${v}, %eax
    out %eax, ${FAULT_PORT:#x}
    hlt
""" for i, v in enumerate(vectors))


def unexpected_idt(vectors: Sequence[int] = (0, 6, 8, 13, 14)) -> dict[int, int]:
    return {v: 0x800 + i * 0x20 for i, v in enumerate(vectors)}


@dataclass(frozen=True)
class Summary:
    """Percentiles of some latencies (ns)."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        v = sorted(values)

        def pct(p: float) -> float:
            return float(v[min(len(v) - 1, int(p * len(v)))])

        return cls(len(v), pct(0.5), pct(0.9), pct(0.99), float(v[-1]))


def kvm_counter(kvm: dict[str, Any], name: str) -> int | None:
    """A KVM stats counter's delta, or None when this kernel has no such statistic."""
    value = kvm.get(name)
    return int(value) if isinstance(value, int) else None


def program(pre: str, loop: str, cpl: int, skip: int) -> str:
    """`pre` in the kernel, then `loop` at `cpl`, then the done signal; #GP skips `skip` bytes."""
    if cpl == 0:
        main = f"""
    {pre}
    {loop}
    out %al, ${DONE_PORT:#x}
2:  hlt
    jmp 2b
"""
    else:
        main = f"""
    {pre}
    pushq ${modes.USER_DATA_SEL:#x}
    pushq ${USER_STACK:#x}
    pushq $2                    # RFLAGS: IF=0, IOPL=0
    pushq ${modes.USER_CODE64_SEL:#x}
    pushq $user
    iretq
user:
    {loop}
    movb $1, {DONE_MMIO:#x}      # `out` would fault at CPL3: a store to no memory slot exits cleanly
2:  jmp 2b
"""
    return main + f"""
.org {GP_HANDLER:#x}                # #GP: count it, skip the instruction, return to user mode
    incq {FAULTS:#x}
    addq ${skip}, 8(%rsp)
    add $8, %rsp
    iretq
{unexpected_fault_handlers((0, 6, 8, 14))}
"""


def cpl_guest(kvm: Kvm, source: str, cpl: int, **kwargs: object) -> Guest:
    """A tiny 64-bit guest for a `program`: its IDT, and for CPL3 user pages and a TSS (RSP0)."""
    idt = {13: GP_HANDLER, **unexpected_idt((0, 6, 8, 14))}
    g = tiny_guest(kvm, "64", source, idt=idt, **kwargs)  # type: ignore[arg-type]
    if cpl == 3:
        # Again with user-accessible pages and a TSS whose RSP0 a fault from user mode switches to.
        modes.setup_long_mode(g.vcpu, g.mem, g.entry, stack=KERNEL_STACK, tss_rsp0=KERNEL_STACK,
                              user_pages=True, idt={v: g.entry + o for v, o in idt.items()})
    return g
