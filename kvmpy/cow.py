"""Copy-on-write guest RAM: a frozen template per region, and which pages a mapping wrote since.

    template = ensure_template(region)         # the region now maps a memfd MAP_PRIVATE
    child = map_child(region)                  # another MAP_PRIVATE mapping of the same memfd
    pages = private_pages(region)              # pages written since (by anyone)
    refresh_template(region)                   # the template becomes the region's contents now

The mechanism behind `kvmpy.machine.fork` and incremental snapshots. A region's
template is a memfd holding the guest RAM of one instant. The region's own
mapping is replaced in place (mmap MAP_FIXED at the same address, so KVM's
memory slot and every `memoryview` of it stay valid) by a MAP_PRIVATE mapping
of that memfd: KVM's MMU notifier drops its mappings of the old pages and
its next fault on each page takes the new one. From then on every write to
the region, whoever makes it (a vCPU through KVM, the VMM through its view,
a vhost back end in the kernel), copies the page into the process's private
anonymous memory and leaves the memfd as it was. Children map the memfd
MAP_PRIVATE too, so none of them sees another's writes.

Which pages were written since the template was made is read from
/proc/self/pagemap: a page of a private file mapping that is present and no
file page (or swapped out) is a private copy. Unlike KVM's dirty log this
also sees the VMM's and vhost's writes (virtqueue used rings, block reads,
received packets), which KVM_GET_DIRTY_LOG never reports.

`refresh_template` makes the template equal to the region again: when no
child maps the memfd, the private pages are written into it and dropped
(MADV_DONTNEED: the mapping then shows the memfd, which has the same bytes);
when children map it, a new memfd is made (the old one's data extents,
copy_file_range, then the private pages on top) and the region remapped on
it, the children keeping the old one.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import GuestMemoryError
from .memory import PAGE_SIZE, MemoryRegion

_PM_PRESENT = 1 << 63
_PM_SWAPPED = 1 << 62
_PM_FILE = 1 << 61  # file page or shared anonymous
_MADV_DONTNEED = 4
_MAP_FIXED = 0x10  # <asm-generic/mman-common.h>; the mmap module does not export it
_SEEK_DATA, _SEEK_HOLE = 3, 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


@dataclass(eq=False)
class Template:
    """A region's frozen contents: a memfd the region (and its children) map MAP_PRIVATE."""

    fd: int
    size: int
    children: int = 0  # mappings handed out by map_child: writing into `fd` would change them

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_templates: weakref.WeakKeyDictionary[MemoryRegion, Template] = weakref.WeakKeyDictionary()
_filled_on_fault: weakref.WeakSet[MemoryRegion] = weakref.WeakSet()


def mark_filled_on_fault(region: MemoryRegion) -> None:
    """The region's missing pages are not zero but filled when touched (userfaultfd: kvmpy/lazy.py)."""
    _filled_on_fault.add(region)


def template_of(region: MemoryRegion) -> Template | None:
    return _templates.get(region)


def _remap_private(region: MemoryRegion, fd: int) -> None:
    """Replace the region's pages in place by a MAP_PRIVATE mapping of `fd` (same address, same size)."""
    addr = region.host_address
    got = _libc.mmap(addr, region.size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)
    if got != addr:
        err = ctypes.get_errno()
        raise GuestMemoryError(f"mmap MAP_FIXED of the template over region {region.slot}: {os.strerror(err)}")


def _new_memfd(size: int, name: str) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


def pagemap(region: MemoryRegion) -> np.ndarray:
    """The region's /proc/self/pagemap entries, one uint64 per page (Documentation/admin-guide/mm/pagemap.rst)."""
    n = region.size // PAGE_SIZE
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        data = os.pread(f.fileno(), n * 8, (region.host_address // PAGE_SIZE) * 8)
    if len(data) != n * 8:
        raise GuestMemoryError(f"/proc/self/pagemap: short read for region {region.slot}")
    return np.frombuffer(data, dtype=np.uint64)


def private_pages(region: MemoryRegion) -> np.ndarray:
    """Page indexes (in the region) the process holds privately: written since the template was mapped."""
    pm = pagemap(region)
    present = (pm & np.uint64(_PM_PRESENT)) != 0
    swapped = (pm & np.uint64(_PM_SWAPPED)) != 0
    file_page = (pm & np.uint64(_PM_FILE)) != 0
    return np.flatnonzero((present & ~file_page) | swapped)


def _runs(pages: np.ndarray) -> list[tuple[int, int]]:
    """Sorted page indexes -> [(first, count)] of consecutive runs."""
    if not len(pages):
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return [(int(pages[s]), int(e - s)) for s, e in zip(starts, ends)]


def page_runs(region: MemoryRegion) -> list[tuple[int, int]]:
    """`private_pages` as [(first page, count)] runs."""
    return _runs(private_pages(region))


def _is_anonymous(region: MemoryRegion) -> bool:
    """Whether the region's mapping is anonymous memory (pages never touched read as zero)."""
    addr = region.host_address
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
            if lo <= addr < hi:
                return int(line.split()[4]) == 0  # inode 0: anonymous
    raise GuestMemoryError(f"region {region.slot} at {addr:#x} is not in /proc/self/maps")


def _write_pages(fd: int, region: MemoryRegion, runs: list[tuple[int, int]]) -> None:
    for first, count in runs:
        off = first * PAGE_SIZE
        view = region.view[off:off + count * PAGE_SIZE]
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], off + done)


def ensure_template(region: MemoryRegion) -> Template:
    """Make the region copy-on-write over a template of its present contents (once; then a no-op).

    A memfd region (GuestMemory(memfd=True)) hands its memfd over, with no
    copy; otherwise the region's contents are copied into a new memfd
    (anonymous memory: only the pages that exist).
    """
    t = _templates.get(region)
    if t is not None:
        return t
    if region.readonly:
        raise GuestMemoryError(f"region {region.slot} is read-only; it needs no copy-on-write template")
    if region.fd >= 0:
        fd, region.fd = region.fd, -1  # the template owns it now: the region no longer maps it shared
    else:
        fd = _new_memfd(region.size, f"kvmpy-template-{region.gpa:#x}")
        try:
            if _is_anonymous(region) and region not in _filled_on_fault:
                pm = pagemap(region)
                _write_pages(fd, region, _runs(np.flatnonzero((pm & np.uint64(_PM_PRESENT | _PM_SWAPPED)) != 0)))
            else:
                _write_pages(fd, region, [(0, region.size // PAGE_SIZE)])
        except BaseException:
            os.close(fd)
            raise
    try:
        _remap_private(region, fd)
    except BaseException:
        os.close(fd)
        raise
    t = Template(fd, region.size)
    _templates[region] = t
    weakref.finalize(region, t.close)
    return t


def map_child(region: MemoryRegion) -> mmap.mmap:
    """A new MAP_PRIVATE mapping of the region's template: a child's copy-on-write view of it."""
    t = _templates.get(region)
    if t is None:
        raise GuestMemoryError(f"region {region.slot} has no template; ensure_template() first")
    m = mmap.mmap(t.fd, t.size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    t.children += 1
    return m


def _copy_extents(src: int, dst: int, size: int) -> None:
    """Copy the data extents of memfd `src` into `dst` (holes stay holes), in the kernel."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src, pos, _SEEK_DATA)
        except OSError:
            return  # ENXIO: no data past pos
        end = os.lseek(src, start, _SEEK_HOLE)
        off = start
        while off < end:
            n = os.copy_file_range(src, dst, end - off, off, off)
            if n <= 0:
                raise GuestMemoryError("copy_file_range between templates copied nothing")
            off += n
        pos = end


def refresh_template(region: MemoryRegion, runs: list[tuple[int, int]] | None = None) -> Template:
    """Make the template hold the region's contents now; returns the (possibly new) template.

    `runs`: the region's private pages if the caller just read them. Call
    with the VM's vCPUs and devices still (the pages must not change meanwhile).
    """
    t = ensure_template(region)
    if runs is None:
        runs = page_runs(region)
    if not runs:
        return t
    if t.children == 0:
        _write_pages(t.fd, region, runs)
        addr = region.host_address
        for first, count in runs:
            if _libc.madvise(addr + first * PAGE_SIZE, count * PAGE_SIZE, _MADV_DONTNEED) != 0:
                err = ctypes.get_errno()
                raise GuestMemoryError(f"madvise(MADV_DONTNEED) on region {region.slot}: {os.strerror(err)}")
        return t
    # Children read through to the old memfd: the new template is a copy with our pages on top.
    fd = _new_memfd(region.size, f"kvmpy-template-{region.gpa:#x}")
    try:
        _copy_extents(t.fd, fd, region.size)
        _write_pages(fd, region, runs)
        _remap_private(region, fd)
    except BaseException:
        os.close(fd)
        raise
    new = Template(fd, region.size)
    _templates[region] = new
    weakref.finalize(region, new.close)
    t.close()  # the children's mappings keep its pages
    return new


def template_regions(memory: Any) -> list[MemoryRegion]:
    """The regions of a GuestMemory that can take a template (all but read-only ones)."""
    return [r for r in memory if not r.readonly]


__all__ = ["Template", "ensure_template", "mark_filled_on_fault", "map_child", "page_runs", "pagemap", "private_pages",
           "refresh_template", "template_of", "template_regions"]
