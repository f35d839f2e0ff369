"""The vCPU exit loop: KVM_RUN, decode the exit, ask the bus, repeat.

Port I/O and MMIO exits take a fast path that reads `kvm_run` in place and
calls the device on the bus without building a record. Every other exit is
decoded into its typed record and given to a handler registered for its
reason; without one, the loop applies the default below and returns the
exit that ended it.

Defaults: INTR (a kick) ends the loop only when `stop()` was called; HLT,
SHUTDOWN, FAIL_ENTRY, SYSTEM_EVENT, DEBUG, INTERNAL_ERROR and anything
else without a handler end the loop. The loop knows no device, no
instruction completion and no statistics: whoever assembles the machine
registers them (`Assists.attach(loop)` completes emulation failures,
`MsrFilter.attach(loop)` answers MSR exits, an `ExitAccounting` passed as
`accounting` counts and times every exit).

A handler that consumed an exit may name what it did with it in
`exit.handled_as`; the loop then books the exit under that name
(`accounting.book_as`), so that `kvmpy stat` shows "syscall trap" rather
than KVM's INTERNAL_ERROR.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

from ._kvm import lib
from .bus import Bus
from .exits import Exit, IntrExit

_IO = lib.KVM_EXIT_IO
_MMIO = lib.KVM_EXIT_MMIO
_INTR = lib.KVM_EXIT_INTR
_OUT = lib.KVM_EXIT_IO_OUT

# A handler returns True to keep running, False to end the loop with this exit,
# or None: not its exit (the next handler of a chain, else the loop ends).
Handler = Callable[[Exit], "bool | None"]


class VcpuLoop:
    """Runs one vCPU against a port-I/O bus and an MMIO bus."""

    def __init__(self, vcpu: Any, pio: Bus, mmio: Bus, *, handlers: dict[int, Handler] | None = None,
                 accounting: Any = None, complete_io_on_stop: bool = True) -> None:
        """`accounting`: an `ExitAccounting` (kvmpy/stats/accounting.py) or None for no bookkeeping."""
        self.vcpu = vcpu
        self.pio = pio
        self.mmio = mmio
        self.handlers: dict[int, Handler] = dict(handlers or {})
        self.accounting = accounting
        self._stop = threading.Event()
        # True: after a stop() from a device, one more KVM_RUN (immediate_exit) completes the pending
        # port or MMIO access, as the KVM API document asks before state is saved. A VM that is reset
        # afterwards (the warm sandbox) skips it and returns at once.
        self.complete_io_on_stop = complete_io_on_stop

    def add_handler(self, reason: int, handler: Handler, *, first: bool = False) -> None:
        """Handle exits of `reason` with `handler`, chained with one already there.

        In a chain each handler returns None for an exit that is not its own,
        and the next one gets it; `first=True` puts `handler` before the others.
        """
        prev = self.handlers.get(reason)
        if prev is None:
            self.handlers[reason] = handler
            return
        a, b = (handler, prev) if first else (prev, handler)

        def chained(exit: Exit) -> bool | None:
            r = a(exit)
            return b(exit) if r is None else r

        self.handlers[reason] = chained

    def rearm(self) -> None:
        """Forget an earlier `stop()`, so `run()` can be called again (a parked vCPU thread, a reused vCPU)."""
        self._stop.clear()
        self.vcpu.run_struct.immediate_exit = 0  # the kick of the stop, if no KVM_RUN consumed it

    def stop(self) -> None:
        """Ask the loop to return at the next exit (kicks the vCPU out of KVM_RUN)."""
        self._stop.set()
        self.vcpu.kick()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> Exit:
        """Run until an exit the loop does not continue from; return that exit."""
        vcpu = self.vcpu
        vcpu.thread_ident = threading.get_ident()
        run = vcpu.run_struct
        page = vcpu.page
        pio_read, pio_write = self.pio.read, self.pio.write
        mmio_read, mmio_write = self.mmio.read, self.mmio.write
        acct = self.accounting
        count_mmio = acct.count_mmio if acct is not None else None
        if acct is not None and acct.c is not None:
            acct.bind(vcpu)
            run_raw = functools.partial(vcpu.run_accounted, acct.c)  # times and ports booked in C
        else:
            run_raw = vcpu.run_raw
        hook = acct.after_exit if acct is not None and acct.per_exit_hook else None
        stopped = self._stop.is_set
        early = None if self.complete_io_on_stop else stopped
        if stopped():
            return IntrExit(_INTR)
        while True:
            reason = run_raw()
            if hook is not None:
                hook(reason)
            if reason == _IO:
                io = run.io
                port, size, count, off = io.port, io.size, io.count, io.data_offset
                if io.direction == _OUT:
                    for i in range(off, off + size * count, size):
                        pio_write(port, size, int.from_bytes(page[i:i + size], "little"))
                else:
                    for i in range(off, off + size * count, size):
                        page[i:i + size] = pio_read(port, size).to_bytes(size, "little")
                if early is not None and early():  # a device asked to stop: no KVM_RUN to see the kick
                    return IntrExit(_INTR)
                continue
            if reason == _MMIO:
                m = run.mmio
                addr, size = m.phys_addr, m.len
                if count_mmio is not None:
                    count_mmio(addr)
                if m.is_write:
                    mmio_write(addr, size, int.from_bytes(bytes(m.data[0:size]), "little"))
                else:
                    value = mmio_read(addr, size)
                    for i in range(size):
                        m.data[i] = (value >> (8 * i)) & 0xFF
                if early is not None and early():
                    return IntrExit(_INTR)
                continue
            if reason == _INTR:
                if self._stop.is_set():
                    return IntrExit(_INTR)
                handler = self.handlers.get(_INTR)
                if handler is not None and handler(IntrExit(_INTR)) is False:
                    return IntrExit(_INTR)
                continue
            exit = vcpu.decode_exit()
            handler = self.handlers.get(reason)
            if handler is not None:
                keep_running = handler(exit)
                if exit.handled_as is not None and acct is not None:
                    acct.book_as(exit.handled_as)
                if keep_running:
                    continue
            return exit
