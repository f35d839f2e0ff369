"""The KVM binary stats reader on synthetic stats files built from the format in the KVM API document.

The files are written here with `struct` from the documented layout
(header: six u32; descriptor: u32 flags, s16 exponent, u16 size, u32
offset, u32 bucket_size, then name_size bytes of name), independently of
the cffi structs the reader uses, and read back through a memfd.
"""

from __future__ import annotations

import os
import struct

import pytest

from kvmpy._kvm import lib
from kvmpy.errors import KvmError
from kvmpy.stats.kvmstats import Descriptor, StatBase, StatsFd, StatType, StatUnit, delta, read_debugfs

NAME_SIZE = 48

# (name, type, unit, base, exponent, values, bucket_size): one of every type and unit.
STATS = [
    ("exits", lib.KVM_STATS_TYPE_CUMULATIVE, lib.KVM_STATS_UNIT_NONE, lib.KVM_STATS_BASE_POW10, 0, [123456789], 0),
    ("pages", lib.KVM_STATS_TYPE_INSTANT, lib.KVM_STATS_UNIT_BYTES, lib.KVM_STATS_BASE_POW2, 12, [77], 0),
    ("max_rmap", lib.KVM_STATS_TYPE_PEAK, lib.KVM_STATS_UNIT_NONE, lib.KVM_STATS_BASE_POW10, 0, [2**64 - 1], 0),
    ("wait_ns", lib.KVM_STATS_TYPE_CUMULATIVE, lib.KVM_STATS_UNIT_SECONDS, lib.KVM_STATS_BASE_POW10, -9, [5], 0),
    ("tsc", lib.KVM_STATS_TYPE_CUMULATIVE, lib.KVM_STATS_UNIT_CYCLES, lib.KVM_STATS_BASE_POW10, 0, [1 << 40], 0),
    ("guest_mode", lib.KVM_STATS_TYPE_INSTANT, lib.KVM_STATS_UNIT_BOOLEAN, lib.KVM_STATS_BASE_POW10, 0, [1], 0),
    ("lin", lib.KVM_STATS_TYPE_LINEAR_HIST, lib.KVM_STATS_UNIT_NONE, lib.KVM_STATS_BASE_POW10, 0,
     [1, 2, 3, 4, 5], 10),
    ("log", lib.KVM_STATS_TYPE_LOG_HIST, lib.KVM_STATS_UNIT_SECONDS, lib.KVM_STATS_BASE_POW10, -9,
     list(range(100, 132)), 0),
]


def build_stats_file(stats: list = STATS, ident: str = "kvm-42/vcpu-3", gap: int = 16) -> bytes:
    """A stats file: header, id, descriptors, data; `gap` spare bytes between parts like a real kernel might leave."""
    header_size, desc_size = 24, 16 + NAME_SIZE
    id_offset = header_size
    desc_offset = id_offset + NAME_SIZE + gap
    data_offset = desc_offset + len(stats) * desc_size + gap
    descs, data = b"", b""
    # Data in reverse order of descriptors, so offsets are not simply sequential.
    offsets = {}
    for name, *_rest, values, _b in reversed(stats):
        offsets[name] = len(data)
        data += struct.pack(f"<{len(values)}Q", *values)
    for name, typ, unit, base, exp, values, bucket in stats:
        flags = typ | unit | base
        descs += struct.pack("<IhHII", flags, exp, len(values), offsets[name], bucket)
        descs += name.encode().ljust(NAME_SIZE, b"\0")
    head = struct.pack("<6I", 0, NAME_SIZE, len(stats), id_offset, desc_offset, data_offset)
    blob = bytearray(data_offset + len(data))
    blob[0:24] = head
    blob[id_offset:id_offset + NAME_SIZE] = ident.encode().ljust(NAME_SIZE, b"\0")
    blob[desc_offset:desc_offset + len(descs)] = descs
    blob[data_offset:] = data
    return bytes(blob)


def stats_fd(blob: bytes) -> StatsFd:
    fd = os.memfd_create("kvmstats-test")
    os.write(fd, blob)
    return StatsFd(fd, label="synthetic")


def test_header_and_id_are_read():
    with stats_fd(build_stats_file()) as s:
        assert s.id == "kvm-42/vcpu-3"
        assert s.name_size == NAME_SIZE
        assert [d.name for d in s.descriptors] == [x[0] for x in STATS]


def test_every_type_unit_and_base_is_decoded():
    with stats_fd(build_stats_file()) as s:
        d = s.by_name
        assert d["exits"].type is StatType.CUMULATIVE and d["exits"].unit is StatUnit.NONE
        assert d["pages"].type is StatType.INSTANT and d["pages"].unit is StatUnit.BYTES
        assert d["pages"].base is StatBase.POW2 and d["pages"].scale == 4096.0
        assert d["max_rmap"].type is StatType.PEAK
        assert d["wait_ns"].unit is StatUnit.SECONDS and d["wait_ns"].scale == pytest.approx(1e-9)
        assert d["tsc"].unit is StatUnit.CYCLES
        assert d["guest_mode"].unit is StatUnit.BOOLEAN
        assert d["lin"].type is StatType.LINEAR_HIST and d["lin"].bucket_size == 10 and d["lin"].size == 5
        assert d["log"].type is StatType.LOG_HIST and d["log"].size == 32


def test_values_come_from_their_offsets_with_their_sizes():
    with stats_fd(build_stats_file()) as s:
        v = s.read()
        for name, *_r, values, _b in STATS:
            d = s.by_name[name]
            if d.is_histogram:
                assert v[name] == tuple(values) and len(v[name]) == d.size
            else:
                assert v[name] == values[0]


def test_repeated_reads_see_new_values():
    blob = bytearray(build_stats_file())
    fd = os.memfd_create("kvmstats-test")
    os.write(fd, blob)
    with StatsFd(fd) as s:
        first = s.read()["exits"]
        off = struct.unpack_from("<I", blob, 20)[0] + s.by_name["exits"].offset
        os.pwrite(fd, struct.pack("<Q", first + 5), off)
        assert s.read()["exits"] == first + 5


def test_histogram_bucket_ranges():
    with stats_fd(build_stats_file()) as s:
        lin, log = s.by_name["lin"], s.by_name["log"]
        assert lin.bucket_range(0) == (0, 10) and lin.bucket_range(3) == (30, 40)
        assert lin.bucket_range(4) == (40, float("inf"))
        assert log.bucket_range(0) == (0, 1) and log.bucket_range(1) == (1, 2) and log.bucket_range(5) == (16, 32)
        with pytest.raises(ValueError):
            s.by_name["exits"].bucket_range(0)


def test_unknown_type_or_unit_stays_readable():
    weird = [("future", 0x0F, 0xF0, lib.KVM_STATS_BASE_POW10, 0, [9], 0)]
    with stats_fd(build_stats_file(weird)) as s:
        d = s.by_name["future"]
        assert d.type == 0x0F and not isinstance(d.type, StatType)
        assert s.read()["future"] == 9
        assert d.describe()["unit"] == "unit0xf0"


def test_delta_subtracts_counters_keeps_instant_and_peak():
    with stats_fd(build_stats_file()) as s:
        before = s.read()
    after = dict(before, exits=before["exits"] + 7, pages=3, lin=(2, 2, 3, 4, 9))
    d = delta(before, after, s.by_name)
    assert d["exits"] == 7
    assert d["pages"] == 3  # instant: the value now
    assert d["max_rmap"] == before["max_rmap"]  # peak: the value now
    assert d["lin"] == (1, 0, 0, 0, 4)


def test_truncated_header_is_an_error_naming_the_file():
    fd = os.memfd_create("kvmstats-test")
    os.write(fd, b"\0" * 10)
    with pytest.raises(KvmError, match="synthetic.*header|header"):
        StatsFd(fd, label="synthetic")


def test_descriptor_scale_for_pow2_negative_exponent():
    d = Descriptor.from_flags("x", lib.KVM_STATS_BASE_POW2, -10, 1, 0, 0)
    assert d.scale == 1 / 1024


def test_debugfs_reader_on_a_synthetic_tree(tmp_path):
    (tmp_path / "exits").write_text("300\n")
    (tmp_path / "io_exits").write_text("100\n")
    vm = tmp_path / "1234-11"
    vm.mkdir()
    (vm / "exits").write_text("200\n")
    (vm / "halt_wait_hist").write_text("")  # not a single number: skipped
    other = tmp_path / "5678-12"
    other.mkdir()
    (other / "exits").write_text("100\n")
    got = read_debugfs(str(tmp_path))
    assert got["all"] == {"exits": 300, "io_exits": 100}
    assert got["1234-11"] == {"exits": 200}
    assert got["5678-12"] == {"exits": 100}


def test_debugfs_reader_without_debugfs(tmp_path):
    assert read_debugfs(str(tmp_path / "missing")) == {}
