"""qcow2 images (versions 2 and 3), read and write, after QEMU's docs/interop/qcow2.txt.

A guest offset is split into an L1 index, an L2 index and an offset in a
cluster (2**cluster_bits bytes). An L2 entry is unallocated (read from
the backing file, else zeros), a zero cluster (bit 0, version 3), a
normal cluster (host offset, bit 63 COPIED when its refcount is 1) or a
compressed cluster (bit 62: host byte offset and a sector count; raw
deflate, read with zlib). Every host cluster in use has a refcount,
kept in refcount blocks that a refcount table points to.

Writes: an allocated cluster is overwritten in place; otherwise a new
cluster is allocated at the end of the file and filled from what the
guest saw there (backing file, decompressed data, zeros) plus the new
bytes. Metadata (L1, L2 tables, refcount blocks and table) is cached and
written back by `flush()` in the order that keeps the image consistent
on a crash at any point (at worst a leaked cluster, never a reference to
a cluster without a refcount, or to data not yet on disk):

1. refcount blocks, then fdatasync (with it, the guest data written so far)
2. refcount table entries for new refcount blocks, fdatasync
3. L2 tables, fdatasync
4. L1 table, fdatasync
5. refcount decrements of clusters no longer referenced (old compressed
   clusters), fdatasync

`create_qcow2` writes a new empty image (optionally with a backing file),
so kvmpy needs no qemu-img at run time.
"""

from __future__ import annotations

import enum
import os
import struct
import zlib
from array import array
from pathlib import Path

from .image import (
    CorruptImageError,
    DiskImage,
    StorageError,
    UnsupportedImageError,
    copy_into,
    fill_zero,
    open_fd,
    preadv_full,
    pwritev_full,
    slice_views,
    views_len,
)
from .lock import ImageLock

MAGIC = b"QFI\xfb"
_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")   # the 72 bytes of version 2
_HEADER_V3 = struct.Struct(">QQQII")          # incompatible, compatible, autoclear, refcount_order, header_length
HEADER_V3_LENGTH = 112                        # with compression_type and padding, as QEMU writes it
_EXT = struct.Struct(">II")

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857

L1E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L2E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
RT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1
MAX_BACKING_DEPTH = 32
MAX_L1_BYTES = 32 << 20        # QEMU's limits (QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE): a header
MAX_REFTABLE_BYTES = 8 << 20   # asking for more is refused before anything is allocated
MAX_DIRTY_TABLES = 64  # write-back cache bound: a guest that never flushes still gets metadata written


class IncompatibleFeature(enum.IntFlag):
    DIRTY = 1 << 0
    CORRUPT = 1 << 1
    EXTERNAL_DATA_FILE = 1 << 2
    COMPRESSION_TYPE = 1 << 3
    EXTENDED_L2 = 1 << 4


_FEATURE_TEXT = {IncompatibleFeature.DIRTY: "dirty (lazy refcounts not written back)",
                 IncompatibleFeature.CORRUPT: "corrupt",
                 IncompatibleFeature.EXTERNAL_DATA_FILE: "external data file",
                 IncompatibleFeature.COMPRESSION_TYPE: "compression type other than zlib",
                 IncompatibleFeature.EXTENDED_L2: "extended L2 entries (subclusters)"}
_REFCOUNT_TYPES = {3: "B", 4: "H", 5: "I", 6: "Q"}


def _be_array(typecode: str, data: bytes) -> array:
    a = array(typecode, data)
    if typecode != "B":
        a.byteswap()
    return a


def _be_bytes(a: array) -> bytes:
    if a.typecode == "B":
        return a.tobytes()
    b = array(a.typecode, a)
    b.byteswap()
    return b.tobytes()


class Qcow2Image(DiskImage):
    """An open qcow2 image; its backing file (if any) is opened read-only as `backing`."""

    format = "qcow2"

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False, lock: bool = True,
                 _depth: int = 0) -> None:
        path = Path(path)
        fd = open_fd(path, readonly)
        self.fd = fd
        self.lock: ImageLock | None = None
        try:
            if lock:
                self.lock = ImageLock.acquire(fd, path, write=not readonly)
            self._open(path, readonly, lock, _depth)
        except BaseException:
            backing = getattr(self, "backing", None)
            if backing is not None:
                backing.close()
            os.close(fd)
            raise

    # -- opening ---------------------------------------------------------------------------------------

    def _open(self, path: Path, readonly: bool, lock: bool, depth: int) -> None:
        head = os.pread(self.fd, 4096, 0)
        if len(head) < _HEADER.size or head[:4] != MAGIC:
            raise CorruptImageError(f"{path}: not a qcow2 image (no QFI\\xfb magic)")
        (_, version, backing_off, backing_len, cluster_bits, size, crypt, l1_size, l1_off, rt_off,
         rt_clusters, nb_snapshots, _) = _HEADER.unpack_from(head)
        if version not in (2, 3):
            raise UnsupportedImageError(f"{path}: qcow2 version {version}; kvmpy reads versions 2 and 3")
        incompat = compat = autoclear = 0
        refcount_order, header_len, compression = 4, 72, 0
        if version == 3:
            incompat, compat, autoclear, refcount_order, header_len = _HEADER_V3.unpack_from(head, 72)
            if header_len > 104:
                compression = head[104]
        super().__init__(path, size, readonly)
        if not 9 <= cluster_bits <= 21:
            raise CorruptImageError(f"{path}: cluster_bits {cluster_bits} outside 9..21")
        self.version = version
        self.cluster_bits = cluster_bits
        self.cluster_size = cs = 1 << cluster_bits
        self.header_length = header_len
        self.compatible_features = compat
        if crypt:
            raise UnsupportedImageError(f"{path}: encrypted qcow2 (crypt_method {crypt}); kvmpy does not decrypt")
        features = self._feature_names(head, header_len, cs)
        bad = incompat & ~(IncompatibleFeature.DIRTY | IncompatibleFeature.CORRUPT)
        if incompat & IncompatibleFeature.COMPRESSION_TYPE and compression == 0:
            bad &= ~IncompatibleFeature.COMPRESSION_TYPE
        if bad:
            names = [_FEATURE_TEXT.get(IncompatibleFeature(1 << b), None) or features.get(b, f"bit {b}")
                     for b in range(64) if bad >> b & 1]
            raise UnsupportedImageError(f"{path}: unsupported incompatible qcow2 feature(s): {', '.join(names)}; "
                                        "convert it with `qemu-img convert -O qcow2 IN OUT`")
        if not readonly and incompat & (IncompatibleFeature.DIRTY | IncompatibleFeature.CORRUPT):
            which = "marked corrupt" if incompat & IncompatibleFeature.CORRUPT else "dirty"
            raise CorruptImageError(f"{path}: image is {which}; repair it with `qemu-img check -r all {path}` "
                                    "or open it read-only")
        if not readonly and nb_snapshots:
            raise UnsupportedImageError(f"{path}: has {nb_snapshots} internal snapshot(s); kvmpy writes only "
                                        "images without them (open it read-only, or use an overlay)")
        if refcount_order not in _REFCOUNT_TYPES:
            raise UnsupportedImageError(f"{path}: refcount_order {refcount_order} ({1 << refcount_order}-bit "
                                        "refcounts); kvmpy handles 8, 16, 32 and 64 bits")
        for name, off in (("L1 table", l1_off), ("refcount table", rt_off)):
            if off % cs:
                raise CorruptImageError(f"{path}: {name} offset {off:#x} is not cluster-aligned")
        self.l2_entries = cs // 8
        need_l1 = -(-size // (cs * self.l2_entries))
        if l1_size < need_l1:
            raise CorruptImageError(f"{path}: L1 table has {l1_size} entries, {need_l1} needed for {size} bytes")
        if 8 * l1_size > MAX_L1_BYTES or rt_clusters * cs > MAX_REFTABLE_BYTES:
            raise CorruptImageError(f"{path}: L1 table ({l1_size} entries) or refcount table ({rt_clusters} "
                                    "clusters) larger than QEMU allows")
        self.l1_offset = l1_off
        self.l1 = _be_array("Q", os.pread(self.fd, 8 * l1_size, l1_off).ljust(8 * l1_size, b"\0"))
        self.rt_offset, self.rt_clusters = rt_off, rt_clusters
        self.rc_table = _be_array("Q", os.pread(self.fd, rt_clusters * cs, rt_off).ljust(rt_clusters * cs, b"\0"))
        self.refcount_type = _REFCOUNT_TYPES[refcount_order]
        self.refcount_max = (1 << (1 << refcount_order)) - 1
        self.rb_entries = cs * 8 >> refcount_order
        self.csize_shift = 62 - (cluster_bits - 8)
        self.csize_mask = (1 << (cluster_bits - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1
        self.l2_cache: dict[int, array] = {}
        self.rb_cache: dict[int, array] = {}
        self.dirty_l2: set[int] = set()
        self.dirty_rb: set[int] = set()
        self.dirty_rt = False
        self.dirty_l1 = False
        self.pending_frees: list[int] = []
        self._zlib_cache: tuple[int, bytes] | None = None
        self.end = -(-os.fstat(self.fd).st_size // cs) * cs  # new clusters go here, always fresh file space
        self.backing_file: str | None = None
        self.backing_format: str | None = None
        if backing_off:
            if backing_len > 1023 or backing_off + backing_len > cs:
                raise CorruptImageError(f"{path}: backing file name ({backing_len} bytes at {backing_off}) "
                                        "outside the header cluster")
            self.backing_file = os.pread(self.fd, backing_len, backing_off).decode()
            self.backing_format = self._backing_format_ext(head, header_len)
            if depth >= MAX_BACKING_DEPTH:
                raise CorruptImageError(f"{path}: backing chain deeper than {MAX_BACKING_DEPTH} (a loop?)")
            from . import open_image
            bpath = Path(self.backing_file)
            if not bpath.is_absolute():
                bpath = path.parent / bpath
            try:
                self.backing = open_image(bpath, format=self.backing_format, readonly=True, lock=lock,
                                          _depth=depth + 1)
            except StorageError as e:
                raise type(e)(f"{path}: backing file: {e}") from None
        if not readonly and version == 3 and autoclear:
            # Autoclear bits flag extensions (bitmaps, raw external data) that a writer which does
            # not update them must clear (qcow2.txt), so QEMU knows they are stale.
            os.pwrite(self.fd, struct.pack(">Q", 0), 88)
            os.fdatasync(self.fd)

    def _extensions(self, head: bytes, header_len: int) -> list[tuple[int, bytes]]:
        out = []
        pos = header_len if self.version == 3 else 72
        while pos + 8 <= len(head):
            etype, elen = _EXT.unpack_from(head, pos)
            if etype == EXT_END:
                break
            out.append((etype, head[pos + 8:pos + 8 + elen]))
            pos += 8 + ((elen + 7) & ~7)
        return out

    def _feature_names(self, head: bytes, header_len: int, cs: int) -> dict[int, str]:
        names: dict[int, str] = {}
        for etype, data in self._extensions(head, header_len):
            if etype == EXT_FEATURE_TABLE:
                for i in range(0, len(data) - 47, 48):
                    ftype, bit = data[i], data[i + 1]
                    if ftype == 0:  # incompatible
                        names[bit] = data[i + 2:i + 48].rstrip(b"\0").decode(errors="replace")
        return names

    def _backing_format_ext(self, head: bytes, header_len: int) -> str | None:
        for etype, data in self._extensions(head, header_len):
            if etype == EXT_BACKING_FORMAT:
                return data.decode()
        return None

    # -- tables ----------------------------------------------------------------------------------------

    def _check_offset(self, off: int, what: str) -> int:
        if off % self.cluster_size:
            raise CorruptImageError(f"{self.path}: {what} offset {off:#x} is not cluster-aligned")
        return off

    def _load_cluster_table(self, cache: dict[int, array], dirty: set[int], off: int, what: str,
                            typecode: str) -> array:
        """The table (an L2 table or a refcount block) at `off`, through `cache`; clean entries are
        dropped when the cache grows past 512 tables."""
        table = cache.get(off)
        if table is None:
            self._check_offset(off, what)
            if len(cache) > 512:
                for k in [k for k in cache if k not in dirty][:256]:
                    del cache[k]
            raw = os.pread(self.fd, self.cluster_size, off).ljust(self.cluster_size, b"\0")
            table = cache[off] = _be_array(typecode, raw)
        return table

    def _load_l2(self, off: int) -> array:
        return self._load_cluster_table(self.l2_cache, self.dirty_l2, off, "L2 table", "Q")

    def _load_rb(self, off: int) -> array:
        return self._load_cluster_table(self.rb_cache, self.dirty_rb, off, "refcount block", self.refcount_type)

    def l2_entry(self, guest_cluster: int) -> int:
        """The L2 entry of guest cluster `guest_cluster` (0: not allocated in this image)."""
        l1e = self.l1[guest_cluster // self.l2_entries]
        off = l1e & L1E_OFFSET_MASK
        if not off:
            return 0
        return self._load_l2(off)[guest_cluster % self.l2_entries]

    def refcount(self, host_cluster: int) -> int:
        ti, bi = divmod(host_cluster, self.rb_entries)
        if ti >= len(self.rc_table):
            return 0
        boff = self.rc_table[ti] & RT_OFFSET_MASK
        return self._load_rb(boff)[bi] if boff else 0

    def _set_refcount(self, host_cluster: int, value: int) -> None:
        if value > self.refcount_max or value < 0:
            raise CorruptImageError(f"{self.path}: refcount of cluster {host_cluster} would be {value}")
        ti, bi = divmod(host_cluster, self.rb_entries)
        if ti >= len(self.rc_table):
            self._grow_refcount_table(ti)
        boff = self.rc_table[ti] & RT_OFFSET_MASK
        if not boff:
            if value == 0:
                return
            boff = self._bump(1)
            self.rb_cache[boff] = array(self.refcount_type, bytes(self.cluster_size))
            self.dirty_rb.add(boff)
            self.rc_table[ti] = boff
            self.dirty_rt = True
            self._set_refcount(boff >> self.cluster_bits, 1)  # a refcount block counts itself, maybe
        block = self._load_rb(boff)
        block[bi] = value
        self.dirty_rb.add(boff)

    def _bump(self, n: int) -> int:
        """Reserve `n` fresh clusters at the end of the file (no refcount yet)."""
        off = self.end  # past everything in the file: fresh clusters read as zeros
        self.end += n * self.cluster_size
        return off

    def _alloc(self, n: int) -> int:
        off = self._bump(n)
        first = off >> self.cluster_bits
        for c in range(first, first + n):
            self._set_refcount(c, 1)
        return off

    def _grow_refcount_table(self, needed_index: int) -> None:
        """A bigger refcount table at the end of the file; the header switches to it once it is durable."""
        per_cluster = self.cluster_size // 8
        old_off, old_n = self.rt_offset, self.rt_clusters
        new_n = max(2 * old_n, -(-(needed_index + 1) // per_cluster) + 1)
        if new_n * self.cluster_size > MAX_REFTABLE_BYTES:
            raise StorageError(f"{self.path}: the refcount table would exceed {MAX_REFTABLE_BYTES >> 20} MiB")
        new_off = self._bump(new_n)
        self.rc_table.extend([0] * (new_n * per_cluster - len(self.rc_table)))
        self.rt_offset, self.rt_clusters = new_off, new_n
        for c in range(new_off >> self.cluster_bits, (new_off >> self.cluster_bits) + new_n):
            self._set_refcount(c, 1)
        self._write_refcount_blocks()
        os.ftruncate(self.fd, max(self.end, os.fstat(self.fd).st_size))
        os.fdatasync(self.fd)                                    # the blocks it points to, first
        os.pwrite(self.fd, _be_bytes(self.rc_table), new_off)
        os.fdatasync(self.fd)                                    # the table, before the header names it
        os.pwrite(self.fd, struct.pack(">QI", new_off, new_n), 48)
        os.fdatasync(self.fd)
        self.dirty_rt = False
        for c in range(old_off >> self.cluster_bits, (old_off >> self.cluster_bits) + old_n):
            self._set_refcount(c, 0)

    def _write_refcount_blocks(self) -> None:
        for off in sorted(self.dirty_rb):
            os.pwrite(self.fd, _be_bytes(self.rb_cache[off]), off)
        self.dirty_rb.clear()

    # -- reading ---------------------------------------------------------------------------------------

    def _compressed(self, entry: int) -> bytes:
        coff = entry & self.coffset_mask
        if self._zlib_cache and self._zlib_cache[0] == coff:
            return self._zlib_cache[1]
        nsect = ((entry >> self.csize_shift) & self.csize_mask) + 1
        raw = os.pread(self.fd, nsect * 512 - (coff & 511), coff)
        try:
            out = zlib.decompressobj(-15).decompress(raw, self.cluster_size)
        except zlib.error as e:
            raise CorruptImageError(f"{self.path}: compressed cluster at {coff:#x}: {e}") from None
        out = out.ljust(self.cluster_size, b"\0")
        self._zlib_cache = (coff, out)
        return out

    def _read_unallocated(self, offset: int, views: list[memoryview]) -> None:
        b = self.backing
        n = views_len(views)
        if b is None or offset >= b.size:
            fill_zero(views)
            return
        inside = min(n, b.size - offset)
        b.readv(offset, slice_views(views, 0, inside))
        if inside < n:
            fill_zero(slice_views(views, inside, n - inside))

    def readv(self, offset: int, views: list[memoryview]) -> None:
        total = views_len(views)
        self.check_range(offset, total, False)
        cs, cb = self.cluster_size, self.cluster_bits
        pos = 0
        while pos < total:
            g = offset + pos
            within = g & (cs - 1)
            n = min(cs - within, total - pos)
            entry = self.l2_entry(g >> cb)
            if entry & QCOW_OFLAG_COMPRESSED:
                data = self._compressed(entry)
                copy_into(slice_views(views, pos, n), memoryview(data)[within:within + n])
            elif entry & QCOW_OFLAG_ZERO:
                fill_zero(slice_views(views, pos, n))
            elif entry & L2E_OFFSET_MASK:
                host = entry & L2E_OFFSET_MASK
                # Extend the run over guest clusters that follow contiguously on the host: one preadv.
                while pos + n < total:
                    nxt = self.l2_entry((g + n) >> cb)
                    if (nxt & (QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO) or
                            (nxt & L2E_OFFSET_MASK) != host + within + n):
                        break
                    n = min(n + cs, total - pos)
                preadv_full(self.fd, slice_views(views, pos, n), host + within)
            else:
                self._read_unallocated(g, slice_views(views, pos, n))
            pos += n

    # -- writing ---------------------------------------------------------------------------------------

    def _l2_for_write(self, guest_cluster: int) -> tuple[array, int]:
        l1i = guest_cluster // self.l2_entries
        l1e = self.l1[l1i]
        off = l1e & L1E_OFFSET_MASK
        if off:
            if not l1e & QCOW_OFLAG_COPIED:
                if self.refcount(off >> self.cluster_bits) != 1:
                    raise CorruptImageError(f"{self.path}: L2 table at {off:#x} is shared; kvmpy does not "
                                            "copy shared tables (internal snapshots)")
                self.l1[l1i] = off | QCOW_OFLAG_COPIED
                self.dirty_l1 = True
            return self._load_l2(off), off
        off = self._alloc(1)
        self.l2_cache[off] = array("Q", bytes(self.cluster_size))
        self.dirty_l2.add(off)
        self.l1[l1i] = off | QCOW_OFLAG_COPIED
        self.dirty_l1 = True
        return self.l2_cache[off], off

    def writev(self, offset: int, views: list[memoryview]) -> None:
        total = views_len(views)
        self.check_range(offset, total, True)
        cs, cb = self.cluster_size, self.cluster_bits
        pos = 0
        while pos < total:
            g = offset + pos
            within = g & (cs - 1)
            n = min(cs - within, total - pos)
            self._write_cluster(g >> cb, within, slice_views(views, pos, n), n)
            pos += n
        if len(self.dirty_l2) + len(self.dirty_rb) > MAX_DIRTY_TABLES:
            self.flush()

    def _write_cluster(self, gc: int, within: int, data: list[memoryview], n: int) -> None:
        cs = self.cluster_size
        table, l2_off = self._l2_for_write(gc)
        i = gc % self.l2_entries
        entry = table[i]
        host = entry & L2E_OFFSET_MASK
        compressed = bool(entry & QCOW_OFLAG_COMPRESSED)
        if (not compressed and host and not entry & QCOW_OFLAG_ZERO
                and (entry & QCOW_OFLAG_COPIED or self.refcount(host >> self.cluster_bits) == 1)):
            self._check_offset(host, "data cluster")
            pwritev_full(self.fd, data, host + within)       # in place: no metadata changes
            if not entry & QCOW_OFLAG_COPIED:
                table[i] = entry | QCOW_OFLAG_COPIED
                self.dirty_l2.add(l2_off)
            return
        fresh = True
        if not compressed and host and entry & QCOW_OFLAG_ZERO and self.refcount(host >> self.cluster_bits) == 1:
            fresh = False  # a preallocated zero cluster: reuse its host cluster
        else:
            host = self._alloc(1)
        if n == cs:
            pwritev_full(self.fd, data, host)
        else:
            # What the guest saw in the rest of the cluster, unless it is zeros in fresh file space.
            base: bytes | None = None
            if compressed:
                base = self._compressed(entry)
            elif entry & QCOW_OFLAG_ZERO:
                base = None if fresh else bytes(cs)
            elif self.backing is not None:
                buf = bytearray(cs)
                self._read_unallocated(gc << self.cluster_bits, [memoryview(buf)])
                base = bytes(buf) if any(buf) else None
            if base is None:
                pwritev_full(self.fd, data, host + within)
            else:
                buf = bytearray(base)
                pos = within
                for v in data:
                    buf[pos:pos + len(v)] = v
                    pos += len(v)
                os.pwrite(self.fd, buf, host)
        if compressed:
            self.pending_frees.append(entry)
        table[i] = host | QCOW_OFLAG_COPIED
        self.dirty_l2.add(l2_off)

    def _free_compressed(self, entry: int) -> None:
        coff = entry & self.coffset_mask
        nsect = ((entry >> self.csize_shift) & self.csize_mask) + 1
        first = coff >> self.cluster_bits
        last = (coff + nsect * 512 - (coff & 511) - 1) >> self.cluster_bits
        for c in range(first, last + 1):
            self._set_refcount(c, self.refcount(c) - 1)

    def flush(self) -> None:
        if self.readonly or self.closed:
            return
        if self.dirty_rb:
            self._write_refcount_blocks()
        if os.fstat(self.fd).st_size < self.end:
            os.ftruncate(self.fd, self.end)  # a partly written last cluster: the file covers it whole
        os.fdatasync(self.fd)                                    # 1. data + refcount blocks
        if self.dirty_rt:
            os.pwrite(self.fd, _be_bytes(self.rc_table), self.rt_offset)
            self.dirty_rt = False
            os.fdatasync(self.fd)                                # 2. refcount table
        if self.dirty_l2:
            for off in sorted(self.dirty_l2):
                os.pwrite(self.fd, _be_bytes(self.l2_cache[off]), off)
            self.dirty_l2.clear()
            os.fdatasync(self.fd)                                # 3. L2 tables
        if self.dirty_l1:
            os.pwrite(self.fd, _be_bytes(self.l1), self.l1_offset)
            self.dirty_l1 = False
            os.fdatasync(self.fd)                                # 4. L1 table
        if self.pending_frees:
            frees, self.pending_frees = self.pending_frees, []
            for entry in frees:
                self._free_compressed(entry)
            self._write_refcount_blocks()
            if self.dirty_rt:
                os.pwrite(self.fd, _be_bytes(self.rc_table), self.rt_offset)
                self.dirty_rt = False
            os.fdatasync(self.fd)                                # 5. frees, after nothing points there

    def _close(self) -> None:
        os.close(self.fd)
        self.fd = -1


def create_qcow2(path: str | os.PathLike[str], size: int, *, backing: str | os.PathLike[str] | None = None,
                 backing_format: str | None = None, cluster_bits: int = 16) -> Path:
    """Write a new, empty version-3 qcow2 image (16-bit refcounts) of `size` bytes; refuses an existing path.

    `backing` is stored as given (relative paths resolve against the new
    image's directory) together with its format, as `qemu-img create -b B -F FMT` does.
    """
    path = Path(path)
    if not 9 <= cluster_bits <= 21:
        raise StorageError(f"{path}: cluster_bits {cluster_bits} outside 9..21")
    if size <= 0 or size % 512:
        raise StorageError(f"{path}: size {size} must be a positive multiple of 512")
    cs = 1 << cluster_bits
    l1_entries = -(-size // (cs * (cs // 8)))
    l1_clusters = -(-l1_entries * 8 // cs)
    rb_entries = cs * 8 // 16
    rb_clusters = 1
    while 2 + rb_clusters + l1_clusters > rb_clusters * rb_entries:
        rb_clusters += 1
    if rb_clusters > cs // 8:
        raise StorageError(f"{path}: {size} bytes is too large for {cs}-byte clusters")
    meta = 2 + rb_clusters + l1_clusters
    ext = b""
    bname = b""
    if backing is not None:
        bname = os.fsencode(backing)
        if backing_format:
            f = backing_format.encode()
            ext += _EXT.pack(EXT_BACKING_FORMAT, len(f)) + f.ljust((len(f) + 7) & ~7, b"\0")
    ext += _EXT.pack(EXT_END, 0)
    backing_off = HEADER_V3_LENGTH + len(ext) if bname else 0
    if backing_off + len(bname) > cs or len(bname) > 1023:
        raise StorageError(f"{path}: backing file name too long for the header cluster")
    header = _HEADER.pack(MAGIC, 3, backing_off, len(bname), cluster_bits, size, 0, l1_entries,
                          (2 + rb_clusters) * cs, cs, 1, 0, 0)
    header += _HEADER_V3.pack(0, 0, 0, 4, HEADER_V3_LENGTH) + bytes(HEADER_V3_LENGTH - 104)
    rc_table = array("Q", [(2 + k) * cs for k in range(rb_clusters)] + [0] * (cs // 8 - rb_clusters))
    blocks = array("H", [1] * meta + [0] * (rb_clusters * rb_entries - meta))
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise StorageError(f"{path}: cannot create: {e.strerror}") from None
    try:
        os.pwrite(fd, (header + ext + bname).ljust(cs, b"\0"), 0)
        os.pwrite(fd, _be_bytes(rc_table), cs)
        os.pwrite(fd, _be_bytes(blocks), 2 * cs)
        os.ftruncate(fd, meta * cs)  # the L1 table: zeros
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return path


__all__ = ["IncompatibleFeature", "MAGIC", "Qcow2Image", "create_qcow2"]
