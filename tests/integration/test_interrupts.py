"""Interrupts from the host reach a long-mode guest through the in-kernel irqchip.

With an in-kernel LAPIC, `hlt` waits inside KVM and never exits to
userspace, so each guest first writes port 0x10 ("ready": IDT, IOAPIC and
LAPIC are programmed, IF=1) and the host injects from that port's device.
The guest's handler writes its vector to port 0x14, whose device stops
the loop. The 8259 PICs are masked: after reset KVM wires LINT0 as ExtINT.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from kvmpy.exits import IntrExit

IOAPIC = 0xFEC0_0000
LAPIC = 0xFEE0_0000
READY, REPORT = 0, 4  # port offsets from 0x10


def _source(vector: int, *, ioapic_pin: int | None = None) -> str:
    redirect = ""
    if ioapic_pin is not None:
        # IOAPIC redirection entry: fixed, edge, physical destination APIC 0.
        redirect = f"""
        movl ${0x10 + 2 * ioapic_pin:#x}, (%rbx)
        movl ${vector:#x}, 0x10(%rbx)
        movl ${0x11 + 2 * ioapic_pin:#x}, (%rbx)
        movl $0, 0x10(%rbx)
        """
    return f"""
        mov $0xff, %al
        out %al, $0x21          # mask the master 8259
        out %al, $0xa1          # and the slave
        mov ${IOAPIC:#x}, %ebx
        mov ${LAPIC:#x}, %esi
        {redirect}
        movl $0x1ff, 0xf0(%rsi) # LAPIC spurious vector register: enable
        sti
        out %al, $0x10          # ready
    1:  hlt
        jmp 1b
    .org 0x100
    handler:
        mov ${vector:#x}, %eax
        out %eax, $0x14         # report the vector
        movl $0, 0xb0(%rsi)     # EOI
        iretq
    """


@pytest.fixture
def interrupt_guest(guest):
    """`interrupt_guest(vector, inject, ioapic_pin=None)`: a guest whose handler for
    `vector` reports it; `inject(g)` runs when the guest says it is ready."""
    watchdogs = []

    def make(vector, inject, *, ioapic_pin=None):
        g = _interrupt_guest(guest, vector, inject, ioapic_pin=ioapic_pin)
        watchdogs.append(g.watchdog)
        return g

    yield make
    for w in watchdogs:
        w.cancel()


def _interrupt_guest(guest, vector, inject, *, ioapic_pin=None):
    g = guest("64", _source(vector, ioapic_pin=ioapic_pin), idt={vector: 0x100}, irqchip=True)
    _inject_when_ready(g, inject)
    return g


def _inject_when_ready(g, inject):
    """`inject(g)` when the guest writes READY; the loop (`g.loop`) stops at its REPORT.

    If the interrupt never arrives the guest would sit in hlt forever; `g.watchdog`
    stops it after a generous while so the test fails on the missing report instead.
    """
    loop = g.make_loop()

    def on_write(offset, size, value):
        if offset == READY:
            inject(g)
        elif offset == REPORT:
            loop.stop()

    g.port.on_write = on_write
    g.watchdog = threading.Timer(60, loop.stop)
    g.watchdog.daemon = True
    g.watchdog.start()


def test_irq_line_through_the_ioapic_reaches_the_programmed_vector(interrupt_guest):
    def inject(g):
        g.vm.irq_line(5, 1)
        g.vm.irq_line(5, 0)

    g = interrupt_guest(0x31, inject, ioapic_pin=5)
    assert isinstance(g.loop.run(), IntrExit)
    assert g.port.values(REPORT) == [0x31]


def test_signal_msi_reaches_the_vector_in_its_data(interrupt_guest):
    status = []
    g = interrupt_guest(0x42, lambda g: status.append(g.vm.signal_msi(LAPIC, 0x42)))
    g.loop.run()
    assert g.port.values(REPORT) == [0x42]
    assert status[0] > 0  # KVM reports the MSI delivered


def test_irqfd_write_raises_its_gsi_and_reaches_the_handler(interrupt_guest):
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        g = interrupt_guest(0x53, lambda g: os.eventfd_write(efd, 1), ioapic_pin=7)
        g.vm.irqfd(efd, 7)
        g.loop.run()
        assert g.port.values(REPORT) == [0x53]
    finally:
        os.close(efd)


def test_nmi_reaches_the_vector_2_handler(interrupt_guest):
    g = interrupt_guest(2, lambda g: g.vcpu.nmi())
    g.loop.run()
    assert g.port.values(REPORT) == [2]


def test_masked_ioapic_pin_delivers_nothing_until_an_msi_arrives(interrupt_guest):
    # Pin 9 is left masked (never programmed): raising it must not reach any handler.
    def inject(g):
        status.append(g.vm.irq_line(9, 1))
        g.vm.irq_line(9, 0)
        g.vm.signal_msi(LAPIC, 0x64)

    status = []
    g = interrupt_guest(0x64, inject)
    g.loop.run()
    assert status[0] < 0  # KVM_IRQ_LINE_STATUS: masked everywhere, not delivered
    assert g.port.values(REPORT) == [0x64]


def test_stop_from_another_thread_kicks_a_spinning_guest_out_with_intr_exit(guest):
    g = guest("64", """
        out %al, $0x10
    spin:
        jmp spin
    """)
    loop = g.make_loop()
    ready = threading.Event()
    g.port.on_write = lambda *_: ready.set()

    def stopper():
        ready.wait(30)
        time.sleep(0.05)  # let the vCPU get back into KVM_RUN (the test holds either way)
        loop.stop()

    t = threading.Thread(target=stopper)
    t.start()
    exit = loop.run()
    t.join(30)
    assert isinstance(exit, IntrExit)
    assert not t.is_alive()
    assert g.vcpu.get_regs().rip == g.entry + 2  # still spinning on `jmp spin`


def test_stop_before_run_returns_intr_exit_without_entering_the_guest(guest):
    g = guest("64", "out %al, $0x10\nhlt")
    loop = g.make_loop()
    loop.stop()
    assert isinstance(loop.run(), IntrExit)
    assert g.port.writes == []


REAL_MODE_GUEST = """
        sti
        out %al, $0x10          # ready
    1:  hlt
        jmp 1b
    .org 0x100
    handler:                    # IRQ 11's handler, installed by the test at vector 0x73
        mov $0x73, %al
        out %al, $0x14          # report
        mov $0x20, %al
        out %al, $0xa0          # EOI to the slave 8259
        out %al, $0x20          # and the master
        iret
"""


def test_bios_state_routes_pic_irqs_to_the_pc_vectors_in_real_mode(guest):
    # What a multiboot kernel finds after a BIOS (kvmpy/x86/firmware.py): IRQ 11 arrives at
    # vector 0x70 + 3 through the slave 8259 and the BSP's ExtINT LINT0; IRQ 10, for which the
    # guest installed nothing, goes to the default handler, which EOIs and returns.
    from guests import write_ivt
    from kvmpy.x86 import firmware

    g = guest("16", REAL_MODE_GUEST, irqchip=True, extra_regions={"bios": {"gpa": 0xF0000, "size": 0x10000}})
    firmware.leave_bios_state(g.vm, g.mem)
    write_ivt(g.mem, {0x73: g.entry + 0x100})
    assert [g.vm.get_irqchip(i).chip.pic.irq_base for i in (0, 1)] == [0x08, 0x70]

    def inject(g):
        for irq in (10, 11):  # edge: latched in the slave's IRR
            g.vm.irq_line(irq, 1)
            g.vm.irq_line(irq, 0)

    _inject_when_ready(g, inject)
    try:
        assert isinstance(g.loop.run(), IntrExit)
    finally:
        g.watchdog.cancel()
    assert g.port.values(REPORT) == [0x73]  # IRQ 10 did not block IRQ 11: its default handler EOIed


def test_bios_default_handlers_are_the_instructions_they_claim(guest):
    from kvmpy.x86 import firmware
    from kvmpy.x86.asm import assemble

    g = guest("16", "hlt", extra_regions={"bios": {"gpa": 0xF0000, "size": 0x10000}})
    firmware.write_real_mode_ivt(g.mem)
    eoi = "push %ax; mov $0x20, %al; {} out %al, $0x20; pop %ax; iret"
    assert g.mem.read(firmware.IRET_STUB, 1) == assemble("iret", "16", 0)
    assert g.mem.read(firmware.MASTER_EOI_STUB, 7) == assemble(eoi.format(""), "16", 0)
    assert g.mem.read(firmware.SLAVE_EOI_STUB, 9) == assemble(eoi.format("out %al, $0xa0;"), "16", 0)
    ivt = [(g.mem.read_u16(4 * v + 2) << 4) + g.mem.read_u16(4 * v) for v in range(256)]
    assert ivt[0x08:0x10] == [firmware.MASTER_EOI_STUB] * 8 and ivt[0x70:0x78] == [firmware.SLAVE_EOI_STUB] * 8
    assert ivt[0x10] == ivt[0x73 + 5] == ivt[0] == firmware.IRET_STUB
