"""A 16550A UART, the PC serial port Linux's 8250 driver expects.

Registers, bits and interrupt priorities follow the National Semiconductor
PC16550D data sheet ("Universal Asynchronous Receiver/Transmitter with
FIFOs"), Table II (register summary) and Table IV (interrupt control). The
machine registers one instance on the port-I/O bus (COM1: 8 ports at 0x3f8,
IRQ 4); offsets below are relative to that base.

What the model does not have, on purpose:

- A transmitter that takes time. A THR write hands the byte to ``output``
  at once, so THR and the transmitter are always empty (LSR.THRE and TEMT
  always read 1). That is what spares Linux's ``wait_for_xmitr`` its
  10,000-iteration LSR polling loop per console character.
- Baud rate, word length, parity and stop bits. LCR and the divisor latch
  are stored and read back for the driver's sake and otherwise ignored.
- Real modem lines. Outside loopback CTS, DSR and DCD are asserted and RI is
  not, so flow control (``UPF_CONS_FLOW``, CRTSCTS) never stalls.

Threading: vCPU threads call ``read``/``write`` and a host input thread calls
``receive``, so all register state sits behind one lock. The ``irq`` and
``output`` callbacks run outside that lock (see ``_deliver_irq_changes`` and
``_write_byte``), so a slow ioctl or a blocked host terminal never stalls the
other threads' register accesses.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable
from enum import IntEnum, IntFlag

from ..bus import ByteRegisters

RX_FIFO_SIZE = 16
"""Bytes the 16550A receiver FIFO holds (FCR.0 set); 1 (the RBR) without it."""

RX_BACKLOG_SIZE = 4096
"""Host bytes kept behind a full RX FIFO and fed in as the guest reads."""

REGISTER_COUNT = 8
"""Ports the UART decodes; the machine registers this many from its base."""


class Register(IntEnum):
    """Register offsets from the base port (data sheet Table II).

    Offsets 0 and 1 are the divisor latch (DLL, DLM) while LCR.DLAB is set;
    offset 2 is IIR when read and FCR when written.
    """

    RBR = 0  # Receiver Buffer Register (read, DLAB=0)
    THR = 0  # Transmitter Holding Register (write, DLAB=0)
    DLL = 0  # Divisor Latch LS (DLAB=1)
    IER = 1  # Interrupt Enable Register (DLAB=0)
    DLM = 1  # Divisor Latch MS (DLAB=1)
    IIR = 2  # Interrupt Identification Register (read)
    FCR = 2  # FIFO Control Register (write)
    LCR = 3  # Line Control Register
    MCR = 4  # Modem Control Register
    LSR = 5  # Line Status Register
    MSR = 6  # Modem Status Register
    SCR = 7  # Scratch Register


class Ier(IntFlag):
    """Interrupt Enable Register bits; the upper four always read 0."""

    ERBFI = 0x01  # Enable Received Data Available Interrupt (and timeout)
    ETBEI = 0x02  # Enable Transmitter Holding Register Empty Interrupt
    ELSI = 0x04  # Enable Receiver Line Status Interrupt
    EDSSI = 0x08  # Enable MODEM Status Interrupt


IER_MASK = 0x0F


class InterruptId(IntEnum):
    """IIR bits 3..0: the pending interrupt of highest priority (Table IV).

    Priority, highest first: LINE_STATUS, RX_DATA / CHAR_TIMEOUT, THR_EMPTY,
    MODEM_STATUS. NONE has bit 0 set: "no interrupt pending".
    """

    NONE = 0x01
    LINE_STATUS = 0x06  # OE/PE/FE/BI; cleared by reading LSR
    RX_DATA = 0x04  # RX FIFO at or above the trigger level; cleared below it
    CHAR_TIMEOUT = 0x0C  # RX data below the trigger level; cleared by reading RBR
    THR_EMPTY = 0x02  # cleared by reading IIR (when the source) or writing THR
    MODEM_STATUS = 0x00  # CTS/DSR/RI/DCD changed; cleared by reading MSR


IIR_FIFOS_ENABLED = 0xC0
"""IIR bits 7..6, both set while FCR.0 (FIFO enable) is set: a 16550A."""


class Fcr(IntFlag):
    """FIFO Control Register bits (write only)."""

    FIFO_ENABLE = 0x01
    RCVR_FIFO_RESET = 0x02  # self-clearing
    XMIT_FIFO_RESET = 0x04  # self-clearing
    DMA_MODE_SELECT = 0x08
    RCVR_TRIGGER_LSB = 0x40
    RCVR_TRIGGER_MSB = 0x80


RX_TRIGGER_LEVELS = (1, 4, 8, 14)
"""RX FIFO trigger level in bytes, indexed by FCR bits 7..6."""


class Lcr(IntFlag):
    """Line Control Register bits; stored and read back, only DLAB acts."""

    WLS0 = 0x01  # word length select
    WLS1 = 0x02
    STB = 0x04  # number of stop bits
    PEN = 0x08  # parity enable
    EPS = 0x10  # even parity select
    STICK_PARITY = 0x20
    SET_BREAK = 0x40
    DLAB = 0x80  # divisor latch access bit


class Mcr(IntFlag):
    """Modem Control Register bits; bits 7..5 always read 0 on a 16550A."""

    DTR = 0x01
    RTS = 0x02
    OUT1 = 0x04
    OUT2 = 0x08  # on a PC, gates the UART's interrupt onto the IRQ line
    LOOP = 0x10


MCR_MASK = 0x1F


class Lsr(IntFlag):
    """Line Status Register bits."""

    DR = 0x01  # data ready
    OE = 0x02  # overrun error
    PE = 0x04  # parity error (never: no parity is simulated)
    FE = 0x08  # framing error (never)
    BI = 0x10  # break interrupt
    THRE = 0x20  # transmitter holding register empty
    TEMT = 0x40  # transmitter empty
    RCVR_FIFO_ERROR = 0x80  # a character with PE/FE/BI is in the FIFO


class Msr(IntFlag):
    """Modem Status Register bits: four deltas (cleared on read), four lines."""

    DCTS = 0x01
    DDSR = 0x02
    TERI = 0x04  # trailing edge of RI: RI went from asserted to not
    DDCD = 0x08
    CTS = 0x10
    DSR = 0x20
    RI = 0x40
    DCD = 0x80


MSR_DELTAS = 0x0F

EXTERNAL_MODEM_LINES = Msr.CTS | Msr.DSR | Msr.DCD
"""The modem inputs outside loopback: a peer that is present and ready."""

DEFAULT_DIVISOR = 0x000C
"""Divisor latch at power-on: 9600 baud from the PC's 1.8432 MHz clock, as
firmware leaves it (the data sheet leaves the latch undefined at reset)."""

_BREAK = 0x100
"""An RX FIFO entry for a received break: reads as 0x00 with LSR.BI."""


class Serial16550(ByteRegisters):
    """A 16550A UART for one port-I/O range of ``REGISTER_COUNT`` ports.

    ``output`` receives each transmitted byte (as a 1-byte ``bytes``) when the
    guest writes THR outside loopback. ``irq`` is the interrupt line: called
    with True when the line rises (an interrupt is pending and MCR.OUT2 is
    set) and with False when it falls, only on changes, in order, and never
    under the register lock.
    """

    def __init__(
        self,
        output: Callable[[bytes], None],
        irq: Callable[[bool], None] | None = None,
    ) -> None:
        self._output = output
        self._irq = irq
        self._lock = threading.Lock()
        # Signalled when the guest frees RX space; waited on by the input thread.
        self._rx_space_freed = threading.Condition(self._lock)
        # Serializes output() calls so bytes leave in THR-write order.
        self._tx_lock = threading.Lock()
        # Serializes irq() calls so line changes reach KVM in the order made.
        self._irq_lock = threading.Lock()

        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._fcr = 0  # FIFO_ENABLE, DMA_MODE_SELECT and trigger bits in force
        self._dll = DEFAULT_DIVISOR & 0xFF
        self._dlm = DEFAULT_DIVISOR >> 8
        self._scr = 0
        self._line_errors = 0  # LSR.OE/BI, latched until LSR is read
        self._msr_deltas = 0  # MSR bits 3..0, latched until MSR is read
        self._thr_interrupt = False  # the THRE interrupt is armed
        self._rx_fifo: deque[int] = deque()  # bytes and _BREAK; RBR is [0]
        self._rx_backlog: deque[int] = deque()  # host input behind the FIFO
        self._overruns = 0

        self._irq_line = False  # the line level as last computed
        self._irq_changes: deque[bool] = deque()  # computed, not yet delivered

    # -- the device interface ------------------------------------------------

    # -- host side -----------------------------------------------------------

    def receive(self, data: bytes) -> int:
        """Queue host input for the guest; return how many bytes were taken.

        Bytes go into the RX FIFO and, when it is full, into a backlog of
        ``RX_BACKLOG_SIZE`` bytes that refills the FIFO as the guest reads, so
        a paste is not lost. Bytes beyond that are dropped, counted in
        ``overruns`` and reported to the guest as LSR.OE. While the guest has
        the UART in loopback its receiver is disconnected from the line, so
        host bytes wait in the backlog until loopback ends.
        """
        with self._lock:
            taken = min(len(data), self._rx_space())
            self._rx_backlog.extend(data[:taken])
            if taken < len(data):
                self._overrun(len(data) - taken)
            self._refill_rx_fifo()
            changed = self._update_irq_line()
        if changed:
            self._deliver_irq_changes()
        return taken

    def receive_break(self) -> bool:
        """Deliver a break condition (e.g. for Linux's magic SysRq); False if full.

        The guest reads it in order with the data as a 0x00 character with
        LSR.BI set, as a 16550A reports a received break.
        """
        with self._lock:
            accepted = self._rx_space() > 0
            if accepted:
                self._rx_backlog.append(_BREAK)
                self._refill_rx_fifo()
            else:
                self._overrun(1)
            changed = self._update_irq_line()
        if changed:
            self._deliver_irq_changes()
        return accepted

    def rx_space(self) -> int:
        """How many bytes ``receive`` would take now without dropping any."""
        with self._lock:
            return self._rx_space()

    def wait_for_rx_space(self, timeout: float | None = None) -> int:
        """Block until the guest frees RX space or ``timeout`` seconds pass.

        For an input thread's back-pressure: read at most the returned number
        of bytes from the host before calling ``receive``. Returns 0 on timeout.
        """
        with self._rx_space_freed:
            self._rx_space_freed.wait_for(lambda: self._rx_space() > 0, timeout)
            return self._rx_space()

    @property
    def overruns(self) -> int:
        """Received characters lost: host bytes beyond the backlog, and
        loopback characters that found the FIFO full."""
        with self._lock:
            return self._overruns

    @property
    def rx_fifo_level(self) -> int:
        """Characters in the RX FIFO (the backlog not included)."""
        with self._lock:
            return len(self._rx_fifo)

    @property
    def pending_interrupt(self) -> InterruptId:
        """What IIR would report now, without the side effect of reading it."""
        with self._lock:
            return self._interrupt_id()

    @property
    def irq_asserted(self) -> bool:
        """The interrupt line's level: an interrupt pending and MCR.OUT2 set."""
        with self._lock:
            return self._irq_line

    # -- register access -----------------------------------------------------

    def _read_byte(self, offset: int) -> int:
        with self._lock:
            value = self._read_register(offset)
            changed = self._update_irq_line()
        if changed:
            self._deliver_irq_changes()
        return value

    def _write_byte(self, offset: int, value: int) -> None:
        # _tx_lock is taken for every offset-0 write because whether it is THR
        # depends on LCR.DLAB, which is only stable under _lock.
        with self._tx_lock if offset == Register.THR else contextlib.nullcontext():
            with self._lock:
                transmitted = self._write_register(offset, value)
                changed = self._update_irq_line()
            if transmitted is not None:
                # Outside _lock: a host terminal that blocks must not stall
                # the input thread, which may be what would unblock it.
                self._output(transmitted)
        if changed:
            self._deliver_irq_changes()

    def _read_register(self, offset: int) -> int:
        dlab = self._lcr & Lcr.DLAB
        if offset == Register.RBR:
            return self._dll if dlab else self._read_rbr()
        if offset == Register.IER:
            return self._dlm if dlab else self._ier
        if offset == Register.IIR:
            return self._read_iir()
        if offset == Register.LCR:
            return self._lcr
        if offset == Register.MCR:
            return self._mcr
        if offset == Register.LSR:
            return self._read_lsr()
        if offset == Register.MSR:
            value = self._modem_lines() | self._msr_deltas
            self._msr_deltas = 0
            return value
        if offset == Register.SCR:
            return self._scr
        return 0xFF

    def _write_register(self, offset: int, value: int) -> bytes | None:
        """Apply a register write; return the byte to transmit, if any."""
        dlab = self._lcr & Lcr.DLAB
        if offset == Register.THR:
            if dlab:
                self._dll = value
                return None
            return self._write_thr(value)
        if offset == Register.IER:
            if dlab:
                self._dlm = value
            else:
                self._write_ier(value)
        elif offset == Register.FCR:
            self._write_fcr(value)
        elif offset == Register.LCR:
            self._lcr = value
        elif offset == Register.MCR:
            self._write_mcr(value)
        elif offset == Register.SCR:
            self._scr = value
        # LSR and MSR are read only (writes to them are factory test modes).
        return None

    def _read_rbr(self) -> int:
        if not self._rx_fifo:
            return 0
        char = self._rx_fifo.popleft()
        self._reveal_head_errors()
        self._refill_rx_fifo()
        self._rx_space_freed.notify_all()
        return 0 if char == _BREAK else char

    def _read_iir(self) -> int:
        interrupt = self._interrupt_id()
        if interrupt == InterruptId.THR_EMPTY:
            # Reading IIR clears THRE only when THRE is what it reports.
            self._thr_interrupt = False
        return interrupt | (IIR_FIFOS_ENABLED if self._fifo_enabled() else 0)

    def _read_lsr(self) -> int:
        value = Lsr.THRE | Lsr.TEMT | self._line_errors
        if self._rx_fifo:
            value |= Lsr.DR
        if self._fifo_enabled() and _BREAK in self._rx_fifo:
            value |= Lsr.RCVR_FIFO_ERROR
        self._line_errors = 0  # OE and BI clear when LSR is read
        return int(value)

    def _write_thr(self, value: int) -> bytes | None:
        # Writing THR clears the THRE interrupt; the instantaneous transmitter
        # empties THR again at once, which re-arms it (as after a real send).
        self._thr_interrupt = True
        if not self._mcr & Mcr.LOOP:
            return bytes((value,))
        # Loopback: the transmitter shift register feeds the receiver.
        if len(self._rx_fifo) < self._rx_capacity():
            self._push_rx(value)
        elif self._fifo_enabled():
            self._overrun(1)  # a 16550A drops the new character
        else:
            self._rx_fifo[-1] = value  # a 16450 overwrites the unread RBR
            self._overrun(1)
        return None

    def _write_ier(self, value: int) -> None:
        old, self._ier = self._ier, value & IER_MASK
        if self._ier & ~old & Ier.ETBEI:
            # 16550 quirk Linux tests at startup (UART_BUG_THRE): enabling
            # ETBEI while THR is empty raises THRE at once, on every rising
            # edge, even if a read of IIR had cleared it before.
            self._thr_interrupt = True
        elif old & ~self._ier & Ier.ETBEI:
            self._thr_interrupt = False

    def _write_fcr(self, value: int) -> None:
        was_enabled = self._fifo_enabled()
        if not value & Fcr.FIFO_ENABLE:
            # FCR.0 must be set for the other bits to be written.
            self._fcr = 0
            if was_enabled:
                self._clear_rx_fifo()  # leaving FIFO mode empties the FIFOs
            return
        self._fcr = value & (
            Fcr.FIFO_ENABLE | Fcr.DMA_MODE_SELECT | Fcr.RCVR_TRIGGER_LSB | Fcr.RCVR_TRIGGER_MSB
        )
        if not was_enabled or value & Fcr.RCVR_FIFO_RESET:
            self._clear_rx_fifo()
        # XMIT_FIFO_RESET: the transmitter holds nothing to reset.

    def _write_mcr(self, value: int) -> None:
        old_lines = self._modem_lines()
        was_loop = self._mcr & Mcr.LOOP
        self._mcr = value & MCR_MASK
        new_lines = self._modem_lines()
        changed = old_lines ^ new_lines
        if changed & Msr.CTS:
            self._msr_deltas |= Msr.DCTS
        if changed & Msr.DSR:
            self._msr_deltas |= Msr.DDSR
        if changed & Msr.DCD:
            self._msr_deltas |= Msr.DDCD
        if old_lines & ~new_lines & Msr.RI:
            self._msr_deltas |= Msr.TERI
        if was_loop and not self._mcr & Mcr.LOOP:
            self._refill_rx_fifo()  # the receiver is on the line again
            self._rx_space_freed.notify_all()

    # -- internal state ------------------------------------------------------

    def _modem_lines(self) -> int:
        """MSR bits 7..4: the modem inputs, or in loopback the MCR outputs."""
        mcr = self._mcr
        if not mcr & Mcr.LOOP:
            return int(EXTERNAL_MODEM_LINES)
        # Loopback wiring (data sheet, MCR bit 4): DTR->DSR, RTS->CTS,
        # OUT1->RI, OUT2->DCD. Linux's probe expects 0x90 for MCR=0x1A.
        lines = 0
        if mcr & Mcr.DTR:
            lines |= Msr.DSR
        if mcr & Mcr.RTS:
            lines |= Msr.CTS
        if mcr & Mcr.OUT1:
            lines |= Msr.RI
        if mcr & Mcr.OUT2:
            lines |= Msr.DCD
        return int(lines)

    def _fifo_enabled(self) -> bool:
        return bool(self._fcr & Fcr.FIFO_ENABLE)

    def _rx_capacity(self) -> int:
        return RX_FIFO_SIZE if self._fifo_enabled() else 1

    def _rx_trigger_level(self) -> int:
        return RX_TRIGGER_LEVELS[self._fcr >> 6]

    def _rx_space(self) -> int:
        fifo_room = 0 if self._mcr & Mcr.LOOP else self._rx_capacity() - len(self._rx_fifo)
        return max(0, RX_BACKLOG_SIZE - len(self._rx_backlog) + fifo_room)

    def _push_rx(self, char: int) -> None:
        self._rx_fifo.append(char)
        if len(self._rx_fifo) == 1:
            self._reveal_head_errors()

    def _reveal_head_errors(self) -> None:
        # In FIFO mode a character's error shows in LSR when it reaches the
        # top of the FIFO (data sheet, LSR bits 2..4).
        if self._rx_fifo and self._rx_fifo[0] == _BREAK:
            self._line_errors |= Lsr.BI

    def _refill_rx_fifo(self) -> None:
        if self._mcr & Mcr.LOOP:
            return
        capacity = self._rx_capacity()
        while self._rx_backlog and len(self._rx_fifo) < capacity:
            self._push_rx(self._rx_backlog.popleft())

    def _clear_rx_fifo(self) -> None:
        # Bytes in the backlog are still "on the line" and arrive afterwards.
        self._rx_fifo.clear()
        self._refill_rx_fifo()
        self._rx_space_freed.notify_all()

    def _overrun(self, lost: int) -> None:
        self._overruns += lost
        self._line_errors |= Lsr.OE

    def _interrupt_id(self) -> InterruptId:
        """The highest-priority pending, enabled interrupt (Table IV)."""
        ier = self._ier
        if ier & Ier.ELSI and self._line_errors:
            return InterruptId.LINE_STATUS
        if ier & Ier.ERBFI and self._rx_fifo:
            # Below the trigger level a real 16550A raises the character
            # timeout after 4 character times; like other emulators we treat
            # it as pending whenever data waits, so no byte is ever stranded.
            if self._fifo_enabled() and len(self._rx_fifo) < self._rx_trigger_level():
                return InterruptId.CHAR_TIMEOUT
            return InterruptId.RX_DATA
        if ier & Ier.ETBEI and self._thr_interrupt:
            return InterruptId.THR_EMPTY
        if ier & Ier.EDSSI and self._msr_deltas:
            return InterruptId.MODEM_STATUS
        return InterruptId.NONE

    def _update_irq_line(self) -> bool:
        """Recompute the line level; queue a change for delivery (under _lock).

        On a PC the UART's INTR output reaches the IRQ line only through a
        buffer enabled by MCR.OUT2; Linux's 8250 driver sets OUT2 when it
        starts a port that has an IRQ and polls otherwise.
        """
        level = self._interrupt_id() != InterruptId.NONE and bool(self._mcr & Mcr.OUT2)
        if level == self._irq_line:
            return False
        self._irq_line = level
        if self._irq is None:
            return False
        self._irq_changes.append(level)
        return True

    def _deliver_irq_changes(self) -> None:
        """Call ``irq`` for each queued line change, in order, outside _lock.

        Every change is delivered, including a fall immediately followed by a
        rise: the ISA IRQ line is edge triggered on the guest's PIC/IOAPIC,
        and collapsing that pair would lose the edge of a new interrupt.
        Whichever thread gets _irq_lock first delivers all queued changes.
        """
        irq = self._irq
        assert irq is not None
        with self._irq_lock:
            while True:
                with self._lock:
                    if not self._irq_changes:
                        return
                    level = self._irq_changes.popleft()
                irq(level)

    # -- snapshots (kvmpy/snapshot.py) ---------------------------------------

    def snapshot_state(self) -> dict:
        """Every register, FIFO and latch as JSON-able values (the callbacks are the machine's)."""
        with self._lock:
            return {
                "ier": self._ier, "lcr": self._lcr, "mcr": self._mcr, "fcr": self._fcr,
                "dll": self._dll, "dlm": self._dlm, "scr": self._scr,
                "line_errors": int(self._line_errors), "msr_deltas": int(self._msr_deltas),
                "thr_interrupt": self._thr_interrupt,
                "rx_fifo": list(self._rx_fifo), "rx_backlog": list(self._rx_backlog),
                "overruns": self._overruns, "irq_line": self._irq_line,
            }

    def restore_state(self, state: dict) -> None:
        """Load what `snapshot_state` returned. The interrupt line level is taken as
        already delivered: the in-kernel irqchip's own state is restored with it."""
        with self._lock:
            self._ier, self._lcr, self._mcr = state["ier"], state["lcr"], state["mcr"]
            self._fcr, self._dll, self._dlm, self._scr = state["fcr"], state["dll"], state["dlm"], state["scr"]
            self._line_errors, self._msr_deltas = state["line_errors"], state["msr_deltas"]
            self._thr_interrupt = bool(state["thr_interrupt"])
            self._rx_fifo = deque(state["rx_fifo"])
            self._rx_backlog = deque(state["rx_backlog"])
            self._overruns = state["overruns"]
            self._irq_line = bool(state["irq_line"])
            self._irq_changes.clear()
            self._rx_space_freed.notify_all()
