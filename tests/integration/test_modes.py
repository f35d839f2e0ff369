"""Tiny guests in real mode, 32-bit protected mode and 64-bit long mode.

Each guest talks to the host only through the recording port at 0x10-0x1f
(and, for MMIO, a device in the unbacked legacy hole), so every assertion
is on what the guest did, never on timing.
"""

from __future__ import annotations

import os

import pytest

from guests import MMIO_HOLE, RecordingPort, tiny_guest
from kvmpy.exits import HltExit

MODES = ["16", "32", "64"]

# String registers by mode: 32-bit names also work in 64-bit code (they zero-extend).
_R = {"16": "", "32": "e", "64": "e"}


@pytest.mark.parametrize("mode", MODES)
def test_port_in_value_comes_back_transformed_through_port_out(guest, mode):
    g = guest(mode, """
        in $0x10, %al
        add %al, %al
        xor $0x5a, %al
        out %al, $0x11
        hlt
    """)
    g.port.reads = [0x21]
    exit = g.run()
    assert isinstance(exit, HltExit)
    assert g.port.read_offsets == [(0, 1)]
    assert g.port.writes == [(1, 1, (0x21 * 2) ^ 0x5A)]


@pytest.mark.parametrize("mode", MODES)
def test_wide_port_in_and_out_carry_32_bit_values(guest, mode):
    g = guest(mode, """
        mov $0x14, %dx
        in %dx, %eax
        not %eax
        out %eax, %dx
        hlt
    """)
    g.port.reads = [0x1234_5678]
    g.run()
    assert g.port.read_offsets == [(4, 4)]
    assert g.port.writes == [(4, 4, 0xEDCB_A987)]


@pytest.mark.parametrize("mode", MODES)
def test_rep_outsb_delivers_every_byte_of_the_string_in_order(guest, mode):
    r = _R[mode]
    g = guest(mode, f"""
        cld
        mov $msg, %{r}si
        mov $(msg_end - msg), %{r}cx
        mov $0x12, %dx
        rep outsb
        hlt
    msg: .ascii "string I/O works"
    msg_end:
    """)
    assert isinstance(g.run(), HltExit)
    assert bytes(g.port.values(2)) == b"string I/O works"


def _mmio_source(mode: str) -> str:
    if mode == "16":
        # Real mode reaches the hole through a segment: 0xd000:0x0010 = 0xd0010.
        return f"""
            mov ${MMIO_HOLE >> 4:#x}, %bx
            mov %bx, %ds
            movl $0xcafef00d, (0x10)
            movl (0x20), %eax
            out %eax, $0x14
            hlt
        """
    return f"""
        movl $0xcafef00d, {MMIO_HOLE + 0x10:#x}
        movl {MMIO_HOLE + 0x20:#x}, %eax
        out %eax, $0x14
        hlt
    """


@pytest.mark.parametrize("mode", MODES)
def test_mmio_write_to_unbacked_address_reaches_the_mmio_bus_device(guest, mode):
    g = guest(mode, _mmio_source(mode))
    dev = RecordingPort(reads=[0x600D_F00D])
    g.mmio.register(MMIO_HOLE, 0x1000, dev, "mmio recorder")
    g.run()
    assert dev.writes == [(0x10, 4, 0xCAFE_F00D)]


@pytest.mark.parametrize("mode", MODES)
def test_mmio_read_from_unbacked_address_is_answered_by_the_device(guest, mode):
    g = guest(mode, _mmio_source(mode))
    dev = RecordingPort(reads=[0x600D_F00D])
    g.mmio.register(MMIO_HOLE, 0x1000, dev, "mmio recorder")
    g.run()
    assert dev.read_offsets == [(0x20, 4)]
    assert g.port.writes == [(4, 4, 0x600D_F00D)]


@pytest.mark.parametrize("mode", MODES)
def test_hlt_without_irqchip_ends_the_loop_right_after_the_hlt(guest, mode):
    g = guest(mode, """
        out %al, $0x10
        hlt
    after_hlt:
        out %al, $0x11
    """)
    exit = g.run()
    assert isinstance(exit, HltExit)
    assert g.port.values(1) == []  # nothing after the hlt ran
    # RIP points past the hlt, at the 2-byte `out` that never ran (CS base is 0 in every mode).
    assert g.vcpu.get_regs().rip == g.entry + len(g.code) - 2


def _host_vendor() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    pytest.skip("/proc/cpuinfo has no vendor_id")  # pragma: no cover


@pytest.mark.parametrize("mode", MODES)
def test_cpuid_leaf_0_vendor_is_the_host_vendor(guest, kvm, mode):
    g = guest(mode, """
        xor %eax, %eax
        xor %ecx, %ecx
        cpuid
        mov %ebx, %eax
        out %eax, $0x14
        mov %edx, %eax
        out %eax, $0x14
        mov %ecx, %eax
        out %eax, $0x14
        hlt
    """)
    g.run()
    vendor = b"".join(v.to_bytes(4, "little") for v in g.port.values(4)).decode()
    assert vendor == _host_vendor()
    leaf0 = next(e for e in kvm.get_supported_cpuid() if e.function == 0)
    supported = b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx)).decode()
    assert vendor == supported


@pytest.mark.parametrize("mode", ["16", "64"])
def test_guest_close_releases_every_file_descriptor(kvm, mode):
    before = set(os.listdir("/proc/self/fd"))
    with tiny_guest(kvm, mode, "hlt") as g:
        g.run()
    assert set(os.listdir("/proc/self/fd")) <= before
