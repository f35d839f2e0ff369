"""Lab 3, interrupt virtualization and injection: from the host's ioctl to the guest's handler.

Part 1, in-kernel irqchip (KVM_CREATE_IRQCHIP: LAPIC, IOAPIC, PICs in KVM).
The guest routes IOAPIC pins to vectors, enables its LAPIC, and waits in
`hlt`. Each handler writes the LAPIC EOI register, reports its vector on a
port, and returns. At each report kvmpy injects the next interrupt, N of
each kind: an IOAPIC pin (KVM_IRQ_LINE), an MSI (KVM_SIGNAL_MSI), an
eventfd bound to a pin (KVM_IRQFD: no ioctl per interrupt) and an NMI
(KVM_NMI). The EOI is an MMIO write KVM's LAPIC handles: no exit to kvmpy.

Part 2, no in-kernel irqchip: the interrupt controller is the VMM's. kvmpy
asks for an interrupt window (kvm_run.request_interrupt_window), KVM exits
with KVM_EXIT_IRQ_WINDOW_OPEN once the guest has IF=1 and can take one,
kvmpy injects with KVM_INTERRUPT, and the guest's EOI is an `out` to the
VMM's PIC port (0x20): three exits per interrupt.

The latency is from just before the injecting call to the handler's report
reaching kvmpy: it includes re-entering the guest, the delivery through
the IDT, the handler's first instructions and one exit.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .._kvm import lib
from ..exits import Exit
from ..kvm import Kvm
from ..platform import detect_backend
from ..runloop import VcpuLoop
from ..stats.kvmstats import StatsFd
from ..tiny import Guest, tiny_guest
from .common import LabError, Summary, run_loop, unexpected_fault_handlers, unexpected_idt
from .report import LabResult, LabTable

IOAPIC, LAPIC = 0xFEC0_0000, 0xFEE0_0000
READY_PORT, REPORT_PORT, PIC_PORT = 0x10, 0x14, 0x20
IRQ_PIN, IRQFD_PIN = 4, 6
IRQ_VECTOR, IRQFD_VECTOR, MSI_VECTOR, NMI_VECTOR, USER_VECTOR = 0x30, 0x31, 0x40, 2, 0x20


def _handler(vector: int, eoi: str) -> str:
    return f"""
    {eoi}
    mov ${vector:#x}, %eax
    out %eax, ${REPORT_PORT:#x}  # tell the host which handler ran
    iretq
"""


def _route(pin: int, vector: int) -> str:
    # IOAPIC redirection entry `pin`: vector, fixed delivery, edge, destination APIC 0.
    return f"""
    movl ${0x10 + 2 * pin:#x}, (%rbx)
    movl ${vector:#x}, 0x10(%rbx)
    movl ${0x11 + 2 * pin:#x}, (%rbx)
    movl $0, 0x10(%rbx)
"""


LAPIC_EOI = "movl $0, 0xb0(%rsi)          # LAPIC EOI register (%rsi = the LAPIC's base)"

IRQCHIP_GUEST = f"""
    mov $0xff, %al
    out %al, $0x21              # mask both 8259 PICs: interrupts come through the IOAPIC
    out %al, $0xa1
    mov ${IOAPIC:#x}, %ebx
    mov ${LAPIC:#x}, %esi
    {_route(IRQ_PIN, IRQ_VECTOR)}
    {_route(IRQFD_PIN, IRQFD_VECTOR)}
    movl $0x1ff, 0xf0(%rsi)     # LAPIC spurious-interrupt register: software enable
    sti
    out %al, ${READY_PORT:#x}
1:  hlt                         # with an in-kernel LAPIC, hlt waits inside KVM
    jmp 1b
.org 0x100
{_handler(IRQ_VECTOR, LAPIC_EOI)}
.org 0x180
{_handler(MSI_VECTOR, LAPIC_EOI)}
.org 0x200
{_handler(IRQFD_VECTOR, LAPIC_EOI)}
.org 0x280
{_handler(NMI_VECTOR, "")}
{unexpected_fault_handlers()}
"""
IRQCHIP_IDT = {IRQ_VECTOR: 0x100, MSI_VECTOR: 0x180, IRQFD_VECTOR: 0x200, NMI_VECTOR: 0x280, **unexpected_idt()}

USERSPACE_GUEST = f"""
    sti
    out %al, ${READY_PORT:#x}
1:  pause                       # no in-kernel LAPIC: `hlt` would exit to kvmpy, so spin
    jmp 1b
.org 0x100
{_handler(USER_VECTOR, f"mov $0x20, %al; out %al, ${PIC_PORT:#x}  # EOI to the VMM's 8259")}
{unexpected_fault_handlers()}
"""
USERSPACE_IDT = {USER_VECTOR: 0x100, **unexpected_idt()}


@dataclass
class Method:
    """One way to interrupt the guest: `inject()` and the vector its handler reports."""

    name: str
    vector: int
    inject: Callable[[], None]
    latencies_ns: list[int] = field(default_factory=list)
    exits: int = 0
    kvm: dict[str, int] = field(default_factory=dict)


class Conductor:
    """The port device that drives the lab: each handler report triggers the next injection."""

    def __init__(self, methods: list[Method], count: int, stats: StatsFd,
                 window: Callable[[], None] | None = None) -> None:
        self.methods = methods
        self.count = count
        self.stats = stats
        self.window = window  # the userspace-irqchip variant: ask for a window instead of injecting now
        self.loop: VcpuLoop | None = None
        self.index = 0
        self.t_inject = 0
        self.eois = 0
        self.mismatched: list[tuple[str, int]] = []
        self._before: dict[str, Any] = {}
        self._exits0 = 0

    @property
    def current(self) -> Method:
        return self.methods[self.index]

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == PIC_PORT - READY_PORT:
            self.eois += 1
            return
        if offset == 0:  # ready
            self._start_method()
            self._next()
            return
        now = time.perf_counter_ns()
        m = self.current
        if value != m.vector:
            self.mismatched.append((m.name, value))
        m.latencies_ns.append(now - self.t_inject)
        if len(m.latencies_ns) == self.count:
            self._end_method()
            self.index += 1
            if self.index == len(self.methods):
                assert self.loop is not None
                self.loop.stop()
                return
            self._start_method()
        self._next()

    def _start_method(self) -> None:
        self._before = dict(self.stats.read())
        assert self.loop is not None
        self._exits0 = self.loop.accounting.snapshot()["exits"]

    def _end_method(self) -> None:
        after = self.stats.read()
        m = self.current
        m.kvm = {k: int(after[k]) - int(self._before[k]) for k in ("exits", "irq_injections", "nmi_injections",
                                                                   "irq_window_exits", "irq_exits")
                 if k in after}
        assert self.loop is not None
        m.exits = self.loop.accounting.snapshot()["exits"] - self._exits0

    def _next(self) -> None:
        if self.window is not None:
            self.window()  # the injection happens at KVM_EXIT_IRQ_WINDOW_OPEN
            return
        self.t_inject = time.perf_counter_ns()
        self.current.inject()

    def window_open(self, exit: Exit) -> bool:
        """KVM_EXIT_IRQ_WINDOW_OPEN: the guest can take an interrupt; inject it (KVM_INTERRUPT)."""
        assert self.loop is not None
        self.loop.vcpu.run_struct.request_interrupt_window = 0
        self.t_inject = time.perf_counter_ns()
        self.current.inject()
        return True


def _with_irqchip(kvm: Kvm, count: int) -> tuple[list[Method], Conductor]:
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with tiny_guest(kvm, "64", IRQCHIP_GUEST, idt=IRQCHIP_IDT, irqchip=True, port_base=0x100) as g:
            g.vm.irqfd(efd, IRQFD_PIN)

            def line() -> None:
                g.vm.irq_line(IRQ_PIN, 1)
                g.vm.irq_line(IRQ_PIN, 0)

            methods = [
                Method("IOAPIC pin (KVM_IRQ_LINE)", IRQ_VECTOR, line),
                Method("MSI (KVM_SIGNAL_MSI)", MSI_VECTOR, lambda: g.vm.signal_msi(LAPIC, MSI_VECTOR)),
                Method("irqfd (eventfd write)", IRQFD_VECTOR, lambda: os.eventfd_write(efd, 1)),
                Method("NMI (KVM_NMI)", NMI_VECTOR, g.vcpu.nmi),
            ]
            return methods, _drive(g, methods, count)
    finally:
        os.close(efd)


def _userspace(kvm: Kvm, count: int) -> tuple[list[Method], Conductor]:
    with tiny_guest(kvm, "64", USERSPACE_GUEST, idt=USERSPACE_IDT, port_base=0x100) as g:
        methods = [Method("KVM_INTERRUPT at the interrupt window (no irqchip)", USER_VECTOR,
                          lambda: g.vcpu.interrupt(USER_VECTOR))]

        def request() -> None:
            g.vcpu.run_struct.request_interrupt_window = 1

        return methods, _drive(g, methods, count, window=request)


def _drive(g: Guest, methods: list[Method], count: int, window: Callable[[], None] | None = None) -> Conductor:
    with StatsFd.of(g.vcpu) as stats:
        conductor = Conductor(methods, count, stats, window)
        g.pio.register(READY_PORT, PIC_PORT - READY_PORT + 1, conductor, "conductor")
        handlers = {lib.KVM_EXIT_IRQ_WINDOW_OPEN: conductor.window_open} if window is not None else {}
        conductor.loop = g.make_loop(handlers)
        exit, _ = run_loop(conductor.loop)
        if conductor.index != len(methods):
            raise LabError(f"interrupt lab: the guest stopped with {exit.name} during {conductor.current.name} "
                           f"after {len(conductor.current.latencies_ns)} interrupts")
    return conductor


def run(kvm: Kvm, quick: bool = False) -> LabResult:
    backend = detect_backend()
    count = 50 if quick else 1000
    result = LabResult("interrupts", "interrupt virtualization and injection", backend.value, quick)
    chip_methods, chip = _with_irqchip(kvm, count)
    user_methods, user = _userspace(kvm, count)
    table = LabTable(f"{count} interrupts of each kind, each handled and EOI'd by the guest",
                     ["injection", "injected", "handler runs", "exits to kvmpy", "exits/interrupt",
                      "KVM irq_injections", "KVM nmi_injections", "KVM irq_window_exits",
                      "p50 us", "p90 us", "p99 us"])
    for m in chip_methods + user_methods:
        s = Summary.of([x / 1e3 for x in m.latencies_ns])
        table.add(m.name, count, len(m.latencies_ns), m.exits, m.exits / count, m.kvm.get("irq_injections"),
                  m.kvm.get("nmi_injections"), m.kvm.get("irq_window_exits"), s.p50, s.p90, s.p99)
    result.tables.append(table)
    eoi = LabTable("where the guest's end-of-interrupt goes",
                   ["interrupt controller", "EOI", "EOIs kvmpy handled"])
    eoi.add("in-kernel LAPIC (KVM_CREATE_IRQCHIP)", f"MMIO store to {LAPIC + 0xB0:#x}", chip.eois)
    eoi.add("kvmpy's 8259 (no irqchip)", f"out to port {PIC_PORT:#x}", user.eois)
    result.tables.append(eoi)
    for c in (chip, user):
        if c.mismatched:
            result.notes.append(f"unexpected vectors reported: {c.mismatched[:5]}")
    result.notes.append("latency = host injection call -> the guest handler's report exit seen by kvmpy "
                        "(one guest entry, IDT delivery, the handler's first instructions, one exit).")
    result.series = {"count": count, "eois": {"irqchip": chip.eois, "userspace": user.eois},
                     "methods": {m.name: {"latencies_ns": m.latencies_ns, "exits": m.exits, "kvm": m.kvm}
                                 for m in chip_methods + user_methods}}
    return result


def plot(result: LabResult, directory: Path) -> list[Path]:
    from .plots import histograms

    samples = {name: [x / 1e3 for x in m["latencies_ns"]] for name, m in result.series["methods"].items()}
    return [histograms(directory / "interrupts.png", samples, xlabel="injection -> handler report (us, log)",
                       title=f"lab interrupts ({result.backend}): latency histograms")]
