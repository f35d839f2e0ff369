"""Dirty-page tracking (kvmpy.dirty) on both mechanisms: the bitmap and the dirty ring."""

from __future__ import annotations

import pytest

from kvmpy.dirty import DirtyLogMode
from kvmpy.errors import KvmError
from kvmpy.exits import ExitReason, HltExit

DATA = 0x100_0000
DATA_PAGES = 512
SMALL_RING = 256  # 4 KiB: KVM's smallest ring; a run writing more pages fills it


def _guest(guest, mode, body, *, ring=1024):
    g = guest("64", body + "\nhlt", extra_regions={"data": dict(gpa=DATA, size=DATA_PAGES * 4096)},
              dirty_ring=ring if mode is DirtyLogMode.RING else 0)
    return g, g.regions["data"].slot


def _writes(pages, offset=0x80):
    return "\n".join(f"movb $1, {DATA + p * 4096 + offset:#x}" for p in pages)


def _loop_writes(first, count, stride=1):
    # One store per page, `count` pages from `first` every `stride` pages.
    return f"""
        mov ${DATA + first * 4096:#x}, %rbx
        mov ${count}, %ecx
    1:  movq $7, 8(%rbx)
        add ${stride * 4096}, %rbx
        dec %ecx
        jnz 1b
    """


MODES = [DirtyLogMode.BITMAP, DirtyLogMode.RING]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_tracker_reports_exactly_the_pages_the_guest_wrote(guest, mode):
    pages = [0, 3, 17, 40, 41, 511]
    g, slot = _guest(guest, mode, _writes(pages) + f"\nmov {DATA + 100 * 4096:#x}, %rax")  # and one read
    tracker = g.vm.start_dirty_tracking()
    assert tracker.mode is mode
    assert isinstance(g.run(), HltExit)
    assert g.vm.dirty_pages()[slot] == pages


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_tracker_rearms_after_collect(guest, mode):
    g, slot = _guest(guest, mode, _writes([5, 6]) + "\nhlt\n" + _writes([6, 300]))
    g.vm.start_dirty_tracking()
    g.run()  # stops at the first hlt
    assert g.vm.dirty_pages().get(slot) == [5, 6]
    assert g.vm.dirty_pages().get(slot, []) == []  # nothing written since
    g.run()
    assert g.vm.dirty_pages()[slot] == [6, 300]  # page 6 again: it was protected anew


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_tracker_ignores_writes_before_it_started(guest, mode):
    g, slot = _guest(guest, mode, _writes([9]) + "\nhlt\n" + _writes([10]))
    g.run()
    g.vm.start_dirty_tracking()
    g.run()
    assert g.vm.dirty_pages()[slot] == [10]


def test_full_ring_exits_and_loses_no_page_unnoticed(guest):
    g, slot = _guest(guest, DirtyLogMode.RING, _loop_writes(0, 400), ring=SMALL_RING)
    tracker = g.vm.start_dirty_tracking()
    handlers = {int(ExitReason.DIRTY_RING_FULL): tracker.on_ring_full}
    assert isinstance(g.run(handlers=handlers), HltExit)
    assert tracker.ring_full_exits >= 1
    pages = g.vm.dirty_pages()[slot]
    # KVM exits at the ring's soft limit, before it is full, so nothing is lost;
    # where a backend lets the ring fill up (PVM's CPL0 emulator) the tracker says so.
    assert pages == list(range(400)) or (tracker.lost and pages == list(range(len(pages))))


def test_bitmap_without_manual_protect_reports_the_same(guest):
    g, slot = _guest(guest, DirtyLogMode.BITMAP, _loop_writes(1, 50, stride=3))
    tracker = g.vm.start_dirty_tracking(manual_protect=False)
    assert not tracker.manual_protect
    g.run()
    assert g.vm.dirty_pages()[slot] == list(range(1, 150, 3))


def test_ring_needs_enabling_before_the_first_vcpu(guest):
    g, _ = _guest(guest, DirtyLogMode.BITMAP, "")
    with pytest.raises(KvmError, match="before the VM's first vCPU"):
        g.vm.enable_dirty_ring(1024)
    with pytest.raises(KvmError, match="enable_dirty_ring"):
        g.vm.start_dirty_tracking(DirtyLogMode.RING)


def test_ring_size_must_be_a_power_of_two(kvm):
    with kvm.create_vm() as vm, pytest.raises(ValueError, match="power of two"):
        vm.enable_dirty_ring(1000)
