"""Warm reset (kvmpy.warm): a used VM brought back to its checkpoint, memory and state."""

from __future__ import annotations

import pytest
from kvmpy._kvm import ffi

from kvmpy.dirty import DirtyLogMode
from kvmpy.errors import KvmError
from kvmpy.exits import HltExit

DATA = 0x100_0000
DATA_PAGES = 256
MODES = [DirtyLogMode.BITMAP, DirtyLogMode.RING]

# Reports rbx, then changes rbx and writes 40 pages of DATA (and its stack).
PROGRAM = f"""
    mov %ebx, %eax
    out %eax, $0x10
    mov $0xdead, %ebx
    push %rbx
    mov ${DATA:#x}, %rdi
    mov $40, %ecx
1:  movq $0x5a5a, 16(%rdi)
    add $4096 * 3, %rdi
    dec %ecx
    jnz 1b
    hlt
.org 0x100
    mov $0x22, %al
    out %al, $0x11                  # the NMI handler says it ran
    hlt
"""


def _guest(guest, mode, **kw):
    g = guest("64", PROGRAM, idt={2: 0x100}, dirty_ring=1024 if mode is DirtyLogMode.RING else 0,
              extra_regions={"data": dict(gpa=DATA, size=DATA_PAGES * 4096)}, **kw)
    r = g.vcpu.get_regs()
    r.rbx = 0x1234
    g.vcpu.set_regs(r)
    return g


def _ram(g):
    return [bytes(r.view) for r in g.mem]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_reset_restores_every_page_the_guest_and_the_host_wrote(guest, mode):
    g = _guest(guest, mode)
    cp = g.vm.checkpoint(dirty_mode=mode)
    before = _ram(g)
    assert isinstance(g.run(), HltExit)
    g.mem.write(DATA + 200 * 4096, b"host wrote this")
    cp.note_write(DATA + 200 * 4096, 15)
    assert _ram(g) != before
    stats = g.vm.reset()
    assert _ram(g) == before
    assert stats.pages >= 41 and not stats.full


def test_hot_pages_stay_writable_and_are_restored(guest):
    g = _guest(guest, DirtyLogMode.BITMAP)
    cp = g.vm.checkpoint(dirty_mode=DirtyLogMode.BITMAP)
    before = _ram(g)
    for _ in range(4):
        g.run()
        g.vm.reset()
        assert _ram(g) == before
    assert cp.tracker.manual_protect and sum(len(p) for p in cp.hot.values()) >= 40


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_guest_runs_again_from_the_checkpoint_with_its_registers(guest, mode):
    g = _guest(guest, mode)
    g.vm.checkpoint(dirty_mode=mode)
    for _ in range(3):
        assert isinstance(g.run(), HltExit)
        g.vm.reset()
    assert g.port.values(0) == [0x1234] * 3


def test_reset_restores_the_fpu_and_sse_registers(guest):
    g = _guest(guest, DirtyLogMode.BITMAP)
    g.vm.checkpoint()
    original = g.vcpu.get_xsave()
    x = bytearray(original)
    x[160:176] = bytes(range(1, 17))  # XMM0 in the XSAVE legacy area (SDM vol. 1, 10.5.1)
    x[24:28] = (0x1F80 ^ 0x6000).to_bytes(4, "little")  # MXCSR: round toward zero
    x[512] |= 3  # XSTATE_BV: x87 and SSE state present
    g.vcpu.set_xsave(bytes(x))
    assert g.vcpu.get_xsave()[160:176] == bytes(range(1, 17))
    g.vm.reset()
    after = g.vcpu.get_xsave()
    assert after[160:176] == original[160:176] and after[24:28] == original[24:28]


def test_reset_drops_a_pending_nmi(guest):
    g = _guest(guest, DirtyLogMode.BITMAP)
    g.vm.checkpoint()
    g.vcpu.nmi()
    g.vm.reset()
    g.run()
    assert g.port.values(1) == []


def test_without_reset_the_pending_nmi_is_taken(guest):
    # The control for the test above: the NMI and its handler work.
    g = _guest(guest, DirtyLogMode.BITMAP)
    g.vcpu.nmi()
    g.run()
    assert g.port.values(1) == [0x22]


def test_reset_restores_the_irqchip(guest):
    g = _guest(guest, DirtyLogMode.BITMAP, irqchip=True)
    g.vm.checkpoint()
    before = [bytes(ffi.buffer(g.vm.get_irqchip(c))) for c in range(3)]
    ioapic = g.vm.get_irqchip(2)
    ioapic.chip.ioapic.redirtbl[5].bits = 0x30  # unmasked, vector 0x30
    g.vm.set_irqchip(ioapic)
    g.vm.irq_line(3, 1)  # the PIC's IRR
    assert [bytes(ffi.buffer(g.vm.get_irqchip(c))) for c in range(3)] != before
    g.vm.reset()
    assert [bytes(ffi.buffer(g.vm.get_irqchip(c))) for c in range(3)] == before


def test_reset_needs_a_checkpoint(kvm):
    with kvm.create_vm() as vm, pytest.raises(KvmError, match="checkpoint"):
        vm.reset()
