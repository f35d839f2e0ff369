"""KVM's own statistics through the binary stats file (KVM_GET_STATS_FD).

The format (KVM API document, 4.133 "KVM_GET_STATS_FD"): a header
(`struct kvm_stats_header`: flags, name_size, num_desc and the offsets of
the id string, the descriptor block and the data block), then
`num_desc` descriptors (`struct kvm_stats_desc` followed by a name of
`name_size` bytes), each giving a statistic's type, unit, base and
exponent, its size in u64 values, its offset in the data block and, for
linear histograms, the bucket width.

The header, id and descriptors never change for the life of the fd, so
`StatsFd` reads them once; `read()` is then a single `os.pread` of the data
block and a slice per statistic. Nothing is known by name: a counter a newer
kernel adds appears without a code change.

Values are raw u64s; `Descriptor.scale` (base ** exponent, in `unit`) turns
them into units: e.g. halt_poll_success_ns has unit seconds, base 10,
exponent -9.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Any, Mapping, Union

from .._kvm import ffi, lib
from ..errors import KvmError

_HEADER = "struct kvm_stats_header"
_DESC = "struct kvm_stats_desc"
_HEADER_SIZE = ffi.sizeof(_HEADER)
_DESC_SIZE = ffi.offsetof(_DESC, "name")  # the fixed part; the name follows


class StatType(enum.IntEnum):
    CUMULATIVE = lib.KVM_STATS_TYPE_CUMULATIVE  # only ever grows (a counter)
    INSTANT = lib.KVM_STATS_TYPE_INSTANT  # a current value (up or down)
    PEAK = lib.KVM_STATS_TYPE_PEAK  # the highest value seen
    LINEAR_HIST = lib.KVM_STATS_TYPE_LINEAR_HIST  # buckets of bucket_size each, last is open
    LOG_HIST = lib.KVM_STATS_TYPE_LOG_HIST  # bucket 0: value 0, bucket i: [2^(i-1), 2^i)


class StatUnit(enum.IntEnum):
    NONE = lib.KVM_STATS_UNIT_NONE
    BYTES = lib.KVM_STATS_UNIT_BYTES
    SECONDS = lib.KVM_STATS_UNIT_SECONDS
    CYCLES = lib.KVM_STATS_UNIT_CYCLES
    BOOLEAN = lib.KVM_STATS_UNIT_BOOLEAN


class StatBase(enum.IntEnum):
    POW10 = lib.KVM_STATS_BASE_POW10
    POW2 = lib.KVM_STATS_BASE_POW2


_HIST_TYPES = (StatType.LINEAR_HIST, StatType.LOG_HIST)

Value = Union[int, tuple[int, ...]]  # a scalar, or the buckets of a histogram


def _enum(cls: type[enum.IntEnum], raw: int) -> Any:
    try:
        return cls(raw)
    except ValueError:
        return raw  # a kind a newer kernel added: keep the number, still readable


@dataclass(frozen=True)
class Descriptor:
    """One statistic as its `struct kvm_stats_desc` describes it."""

    name: str
    flags: int
    type: StatType | int
    unit: StatUnit | int
    base: StatBase | int
    exponent: int
    size: int  # number of u64 values (1 for scalars, the bucket count for histograms)
    offset: int  # bytes into the data block
    bucket_size: int  # width of a linear-histogram bucket

    @classmethod
    def from_flags(cls, name: str, flags: int, exponent: int, size: int, offset: int,
                   bucket_size: int) -> Descriptor:
        return cls(name, flags,
                   _enum(StatType, flags & lib.KVM_STATS_TYPE_MASK),
                   _enum(StatUnit, flags & lib.KVM_STATS_UNIT_MASK),
                   _enum(StatBase, flags & lib.KVM_STATS_BASE_MASK),
                   exponent, size, offset, bucket_size)

    @property
    def is_histogram(self) -> bool:
        return self.type in _HIST_TYPES

    @property
    def scale(self) -> float:
        """Multiply a raw value by this to get `unit`s (seconds, bytes, cycles)."""
        return float((10 if self.base == StatBase.POW10 else 2) ** self.exponent)

    def bucket_range(self, i: int) -> tuple[float, float]:
        """[low, high) of histogram bucket `i`, in raw units (high is inf for the last linear one)."""
        if self.type == StatType.LINEAR_HIST:
            high = float("inf") if i == self.size - 1 else float((i + 1) * self.bucket_size)
            return float(i * self.bucket_size), high
        if self.type == StatType.LOG_HIST:
            return (0.0, 1.0) if i == 0 else (float(1 << (i - 1)), float(1 << i))
        raise ValueError(f"{self.name} is not a histogram")

    @property
    def unit_name(self) -> str:
        u = self.unit
        return u.name.lower() if isinstance(u, StatUnit) else f"unit{u:#x}"

    def describe(self) -> dict[str, Any]:
        """JSON-ready description."""
        t = self.type
        return {"name": self.name, "type": t.name.lower() if isinstance(t, StatType) else int(t),
                "unit": self.unit_name, "base": 10 if self.base == StatBase.POW10 else 2,
                "exponent": self.exponent, "size": self.size, "bucket_size": self.bucket_size}


def parse_header(data: bytes) -> tuple[int, int, int, int, int, int]:
    """(flags, name_size, num_desc, id_offset, desc_offset, data_offset) of a stats file header."""
    if len(data) < _HEADER_SIZE:
        raise KvmError(f"stats fd: header of {len(data)} bytes, expected {_HEADER_SIZE}")
    h = ffi.cast(f"{_HEADER} *", ffi.from_buffer(data))
    return h.flags, h.name_size, h.num_desc, h.id_offset, h.desc_offset, h.data_offset


def parse_descriptors(block: bytes, num_desc: int, name_size: int) -> list[Descriptor]:
    """The `num_desc` descriptors of a descriptor block."""
    stride = _DESC_SIZE + name_size
    if len(block) < num_desc * stride:
        raise KvmError(f"stats fd: descriptor block of {len(block)} bytes, expected {num_desc * stride}")
    buf = ffi.from_buffer(block)
    out = []
    for i in range(num_desc):
        d = ffi.cast(f"{_DESC} *", buf + i * stride)
        raw = block[i * stride + _DESC_SIZE:(i + 1) * stride]
        name = raw.split(b"\0", 1)[0].decode("ascii", "replace")
        out.append(Descriptor.from_flags(name, d.flags, d.exponent, d.size, d.offset, d.bucket_size))
    return out


class StatsFd:
    """A KVM binary stats file: the descriptors once, the values on each `read()`.

    `fd` is what `Vm.get_stats_fd()` / `Vcpu.get_stats_fd()` returned (or any
    file in that format); the `StatsFd` owns and closes it.
    """

    def __init__(self, fd: int, *, label: str = "stats fd") -> None:
        self.fd = fd
        self.label = label
        try:
            (self.flags, self.name_size, num_desc, id_offset, desc_offset,
             self.data_offset) = parse_header(os.pread(fd, _HEADER_SIZE, 0))
            # The id string ("kvm-<pid>" or "kvm-<pid>/vcpu-<n>") sits between header and descriptors.
            self.id = os.pread(fd, self.name_size, id_offset).split(b"\0", 1)[0].decode("ascii", "replace")
            block = os.pread(fd, num_desc * (_DESC_SIZE + self.name_size), desc_offset)
            self.descriptors = parse_descriptors(block, num_desc, self.name_size)
        except OSError as e:
            os.close(fd)
            raise KvmError(f"{label}: cannot read the stats header ({e.strerror})") from e
        except BaseException:
            os.close(fd)
            raise
        self.by_name = {d.name: d for d in self.descriptors}
        self.data_size = max((d.offset + 8 * d.size for d in self.descriptors), default=0)
        # Where each statistic's u64s are in the data block (in u64 units).
        self._slices = [(d.name, d.offset // 8, d.offset // 8 + d.size, d.is_histogram)
                        for d in self.descriptors]

    @classmethod
    def of(cls, owner: Any) -> StatsFd:
        """The stats of a `Vm` or `Vcpu` (anything with `get_stats_fd()`)."""
        label = f"vcpu {owner.id} stats" if hasattr(owner, "run_struct") else "vm stats"
        return cls(owner.get_stats_fd(), label=label)

    def read_raw(self) -> memoryview:
        """The data block as u64s (one pread)."""
        data = os.pread(self.fd, self.data_size, self.data_offset)
        if len(data) != self.data_size:
            raise KvmError(f"{self.label}: short read of the data block ({len(data)} of {self.data_size} bytes)")
        return memoryview(data).cast("Q")

    def read(self) -> dict[str, Value]:
        """{name: value}: an int for scalars, a tuple of bucket counts for histograms."""
        q = self.read_raw()
        out: dict[str, Value] = {}
        for name, lo, hi, hist in self._slices:
            out[name] = tuple(q[lo:hi]) if hist else q[lo]
        return out

    def describe(self) -> list[dict[str, Any]]:
        return [d.describe() for d in self.descriptors]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> StatsFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StatsFd({self.id!r}, {len(self.descriptors)} statistics)"


def delta(before: Mapping[str, Value], after: Mapping[str, Value],
          descriptors: Mapping[str, Descriptor]) -> dict[str, Value]:
    """What changed from `before` to `after`: differences of cumulative counters and
    histograms, the `after` value of instant and peak statistics."""
    out: dict[str, Value] = {}
    for name, b in after.items():
        a = before.get(name)
        d = descriptors.get(name)
        kind = d.type if d is not None else StatType.CUMULATIVE
        if a is None or kind in (StatType.INSTANT, StatType.PEAK):
            out[name] = b
        elif isinstance(b, tuple):
            out[name] = tuple(y - x for x, y in zip(a, b))  # type: ignore[arg-type]
        else:
            out[name] = b - a  # type: ignore[operator]
    return out


def read_debugfs(root: str = "/sys/kernel/debug/kvm") -> dict[str, dict[str, int]]:
    """Host-wide KVM counters from debugfs: {"all": {name: value}, "<pid>-<fd>": {...}, ...}.

    debugfs has one file per statistic summed over every VM of the host, and
    one directory per VM (named "<pid>-<vm fd>") with the same files; this
    sees VMs of other processes too. Empty if `root` does not exist (debugfs
    not mounted, or no permission).
    """
    result: dict[str, dict[str, int]] = {}
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return result
    total: dict[str, int] = {}
    for e in entries:
        if e.is_file():
            v = _read_int(e.path)
            if v is not None:
                total[e.name] = v
        elif e.is_dir() and "-" in e.name and e.name.split("-", 1)[0].isdigit():
            per_vm: dict[str, int] = {}
            try:
                files = sorted(os.scandir(e.path), key=lambda f: f.name)
            except OSError:
                continue
            for f in files:
                if f.is_file():
                    v = _read_int(f.path)
                    if v is not None:
                        per_vm[f.name] = v
            result[e.name] = per_vm
    result["all"] = total
    return result


def _read_int(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            text = f.read(64).split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None  # a histogram or an unreadable file: debugfs histograms are not single numbers
