"""One typed description of a machine: what to boot, on how much, with which devices.

Every front end builds a `MachineConfig`: `kvmpy run` from its arguments
(the `parse` functions below hold the command-line grammar), `kvmpy.MicroVM`
from a script, the kvm-unit-tests runner from a test's QEMU parameters, a
snapshot from its manifest. `validate()` checks every field once, before any
file is opened or any VM exists, and returns the normalized config (sizes in
bytes, paths as `Path`, sequences as tuples); a bad field raises
`ConfigError` naming the field and the fix.

The configs are data: frozen, comparable, `to_dict()` for a manifest. Live
objects (an open image, a TAP) are made from them by the builder
(`kvmpy/machine/builder.py`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..boot.linux import VMLINUX_CMDLINE_SIZE
from ..errors import BootError
from ..memory import parse_size
from ..virtiofsd import CacheMode, ShareConfig, ShareError, validate_shares
from ..x86.mptable import max_cpus

# Like Firecracker's default: serial console, reset through the keyboard
# controller, no module loading, and a panic turns into a reset we can see.
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1 nomodule i8042.noaux i8042.nomux i8042.dumbkbd"
DEFAULT_MEMORY = 128 << 20  # as Firecracker; boot time on an emulating backend grows with it

# x86 COMMAND_LINE_SIZE less its NUL. The user's part may fill at most half:
# kvmpy adds quirk masks, tsc_early_khz and one virtio_mmio.device= per device.
MAX_CMDLINE = VMLINUX_CMDLINE_SIZE
MAX_USER_CMDLINE = MAX_CMDLINE // 2

MIN_MEMORY = 32 << 20
QUIRKS = ("auto", "pvm", "none")
ENTRIES = ("auto", "linux64", "pvh", "multiboot")
TEST_DEVICES = ("debug-exit", "testdev", "fw-cfg", "acpi")
VSOCK_BACKENDS = ("auto", "vhost", "userspace")
IFNAMSIZ = 16
_MAC = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


class ConfigError(BootError, ValueError):
    """A config field is wrong; the message names the field and the fix."""


def memory_problem(size: int) -> str | None:
    """What is wrong with `size` bytes as a Linux guest's RAM on this host, or None."""
    import psutil

    host = psutil.virtual_memory().total
    if size < MIN_MEMORY:
        return f"{size >> 20} MiB is too small to boot Linux (at least {MIN_MEMORY >> 20} MiB)"
    if size > host:
        return f"{size >> 20} MiB is more than this host has ({host >> 20} MiB)"
    if size % 4096:
        return f"{size:#x} bytes is not a multiple of 4 KiB"
    return None


def _readable_file(what: str, value: str | os.PathLike[str]) -> Path:
    p = Path(value)
    if p.is_dir():
        raise ConfigError(f"{what} {str(p)!r}: is a directory, not a file")
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r}: no such file")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"{what} {str(p)!r}: not readable by this user")
    return p


# -- devices -----------------------------------------------------------------------

@dataclass(frozen=True)
class DiskConfig:
    """A virtio-blk disk backed by a host file or block device."""

    path: Path
    read_only: bool = False

    @classmethod
    def parse(cls, text: str) -> DiskConfig:
        """`--disk IMG[,ro]`."""
        path, _, opts = text.partition(",")
        if not path or opts not in ("", "ro", "rw"):
            raise ConfigError(f"--disk {text!r}: expected IMG or IMG,ro")
        return cls(Path(path), opts == "ro")

    def validated(self, where: str) -> DiskConfig:
        p = Path(self.path)
        if p.is_dir():
            raise ConfigError(f"{where} {str(p)!r}: is a directory, not a disk image")
        if not (p.is_file() or p.is_block_device()):
            raise ConfigError(f"{where} {str(p)!r}: no such file or block device")
        if not os.access(p, os.R_OK if self.read_only else os.R_OK | os.W_OK):
            raise ConfigError(f"{where} {str(p)!r}: not {'readable' if self.read_only else 'writable'}; "
                              "use DiskConfig(path, read_only=True) (--disk IMG,ro) for a read-only disk")
        return DiskConfig(p, bool(self.read_only))


@dataclass(frozen=True)
class NetConfig:
    """A virtio-net interface on a host TAP device (`tap` None: the machine creates one with a generated name)."""

    tap: str | None = None
    mac: str | None = None
    host_address: str | None = None  # "ADDR/PREFIX" for the host end of the TAP, e.g. "172.30.0.1/24"
    bridge: str | None = None  # an existing bridge to enslave the TAP to instead

    @classmethod
    def parse(cls, text: str) -> NetConfig:
        """`--net tap[=NAME][,ip=ADDR/PREFIX][,mac=MAC][,bridge=BR]`."""
        first, *rest = text.split(",")
        kind, _, name = first.partition("=")
        if kind != "tap":
            raise ConfigError(f"--net {text!r}: only TAP networking exists: tap[=NAME][,ip=ADDR/PREFIX][,mac=MAC]")
        keys = {"ip": "host_address", "mac": "mac", "bridge": "bridge"}
        opts: dict[str, str] = {}
        for item in rest:
            key, _, value = item.partition("=")
            if key not in keys or not value:
                raise ConfigError(f"--net {text!r}: unknown option {item!r} (ip=, mac=, bridge=)")
            opts[keys[key]] = value
        return cls(tap=name or None, **opts)

    def validated(self, where: str) -> NetConfig:
        if self.tap is not None and not (0 < len(self.tap) < IFNAMSIZ and "/" not in self.tap
                                         and not any(c.isspace() for c in self.tap)):
            raise ConfigError(f"{where} tap {self.tap!r}: not a valid interface name (1-15 characters)")
        if self.mac is not None and not _MAC.match(self.mac):
            raise ConfigError(f"{where} mac {self.mac!r}: expected six hex bytes like 52:54:00:12:34:56")
        if self.host_address is not None:
            try:
                ipaddress.ip_interface(self.host_address)
            except ValueError:
                raise ConfigError(f"{where} host_address {self.host_address!r}: expected ADDR/PREFIX like "
                                  "172.30.0.1/24") from None
        return self


@dataclass(frozen=True)
class VsockConfig:
    """A virtio-vsock device with the guest's context ID.

    `backend`: "auto" (the kernel's vhost-vsock when /dev/vhost-vsock exists,
    else userspace), "vhost" (an error if it is missing) or "userspace"
    (AF_UNIX sockets, Firecracker's layout; the one that can be snapshotted).
    `uds_path`: the userspace back end's socket (default
    /tmp/kvmpy-<pid>-vsock.sock).
    """

    cid: int
    backend: str = "auto"
    uds_path: str | None = None

    @classmethod
    def parse(cls, text: str) -> VsockConfig:
        """`--vsock CID[,backend=auto|vhost|userspace]`."""
        first, *rest = text.split(",")
        if not first.isdigit():
            raise ConfigError(f"--vsock {text!r}: expected CID[,backend={'|'.join(VSOCK_BACKENDS)}], "
                              "e.g. 3,backend=vhost")
        backend = "auto"
        for item in rest:
            key, _, value = item.partition("=")
            if key != "backend" or value not in VSOCK_BACKENDS:
                raise ConfigError(f"--vsock {text!r}: unknown option {item!r} (backend={'|'.join(VSOCK_BACKENDS)})")
            backend = value
        return cls(int(first), backend)

    def validated(self, where: str) -> VsockConfig:
        if not isinstance(self.cid, int) or not 3 <= self.cid < 0xFFFF_FFFF:
            raise ConfigError(f"{where}: guest CID {self.cid!r}; 0-2 are reserved, use 3 to 2^32-2")
        if self.backend not in VSOCK_BACKENDS:
            raise ConfigError(f"{where}: backend {self.backend!r}; one of {', '.join(map(repr, VSOCK_BACKENDS))}")
        return self


@dataclass(frozen=True)
class ModuleConfig:
    """A multiboot module: a file and its command-line string."""

    path: Path
    string: str = ""

    @classmethod
    def parse(cls, text: str) -> ModuleConfig:
        """`--module FILE[,STRING]`."""
        path, _, string = text.partition(",")
        if not path:
            raise ConfigError(f"--module {text!r}: expected FILE[,STRING]")
        return cls(Path(path), string)


# -- the machine -------------------------------------------------------------------

CpuidHook = Callable[[Any, int, int], list]  # (kvm, apic_id, vcpus) -> CPUID entries


@dataclass(frozen=True)
class MachineConfig:
    """A whole machine. Construct it with plain values; `validate()` returns the checked, normalized copy.

    Devices are attached in this order, each at its own 4 KiB MMIO window
    from 0xd0000000 and its own GSI (5, 6, 7, 9, ...): disks, nets, rng,
    vsock, shares.
    """

    kernel: str | os.PathLike[str] | None
    initrd: str | os.PathLike[str] | None = None
    cmdline: str = DEFAULT_CMDLINE
    memory: int | str = DEFAULT_MEMORY
    vcpus: int = 1
    quirks: str = "auto"  # auto | pvm | none (kvmpy/platform.py)
    entry: str = "auto"  # auto | linux64 | pvh | multiboot (auto: multiboot for a kernel that is only that)
    disks: Sequence[DiskConfig | str | os.PathLike[str]] = ()
    nets: Sequence[NetConfig | str] = ()
    vsock: VsockConfig | int | str | None = None
    rng: bool = False  # a virtio-rng device fed from the host's urandom
    shares: Sequence[ShareConfig | str] = ()  # host directories over virtio-fs (kvmpy/virtiofsd.py)
    modules: Sequence[ModuleConfig | tuple[str | os.PathLike[str], str]] = ()  # multiboot modules
    # QEMU's test devices, off in the micro-VM: any of "debug-exit" (isa-debug-exit
    # at 0xf4: the VM ends with status (code << 1) | 1), "testdev" (pc-testdev
    # ports and MMIO buffer), "fw-cfg" (0x510), "acpi" (RSDP/RSDT/FADT, PM timer).
    test_devices: Sequence[str] = ()
    pit: bool = True  # the in-kernel i8254 (QEMU's -machine pit=off drops it)
    # Each vCPU's CPUID table. None: KVM's supported table with the topology of
    # `vcpus` (kvmpy.x86.cpuid.vcpu_cpuid). Not recordable in a snapshot.
    cpuid: CpuidHook | None = field(default=None, compare=False)

    def validate(self, *, kernel_optional: bool = False) -> MachineConfig:
        """The config with every field checked and normalized, or `ConfigError` naming the first bad one.

        `kernel_optional`: a missing kernel is not an error yet (`kvmpy run`
        checks its arguments before it builds its default guest kernel).
        """
        if self.kernel is None and not kernel_optional:
            raise ConfigError("kernel: required (a vmlinux, bzImage or multiboot kernel path)")
        kernel = None if self.kernel is None else _readable_file("kernel", self.kernel)
        initrd = None if self.initrd is None else _readable_file("initrd", self.initrd)
        if not isinstance(self.cmdline, str) or "\0" in self.cmdline:
            raise ConfigError("cmdline: must be a string without NUL bytes")
        if len(self.cmdline.encode()) > MAX_USER_CMDLINE:
            raise ConfigError(f"cmdline: {len(self.cmdline.encode())} bytes; at most {MAX_USER_CMDLINE} leave "
                              f"room for the words kvmpy adds (limit {MAX_CMDLINE} in all)")
        try:
            memory = parse_size(self.memory)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"memory: {e}") from None
        problem = memory_problem(memory)
        if problem:
            raise ConfigError(f"memory: {problem}")
        if not isinstance(self.vcpus, int) or isinstance(self.vcpus, bool) or not 1 <= self.vcpus <= max_cpus():
            raise ConfigError(f"vcpus: {self.vcpus!r}; must be an integer from 1 to {max_cpus()}")
        if self.quirks not in QUIRKS:
            raise ConfigError(f"quirks: {self.quirks!r}; one of {', '.join(map(repr, QUIRKS))}")
        if self.entry not in ENTRIES:
            raise ConfigError(f"entry: {self.entry!r}; one of {', '.join(map(repr, ENTRIES))}")
        disks = tuple(as_disk(d).validated(f"disks[{i}]") for i, d in enumerate(self.disks))
        nets = tuple(as_net(n).validated(f"nets[{i}]") for i, n in enumerate(self.nets))
        vsock = None if self.vsock is None else as_vsock(self.vsock).validated("vsock")
        try:
            shares = tuple(validate_shares(list(self.shares)))
        except ShareError as e:
            raise ConfigError(str(e)) from None
        modules = tuple(as_module(m) for m in self.modules)
        for m in modules:
            _readable_file("multiboot module", m.path)
        test_devices = tuple(self.test_devices)
        unknown = set(test_devices) - set(TEST_DEVICES)
        if unknown:
            raise ConfigError(f"test_devices: unknown {', '.join(sorted(unknown))}; "
                              f"choose from {', '.join(TEST_DEVICES)}")
        return dataclasses.replace(self, kernel=kernel, initrd=initrd, memory=memory, disks=disks, nets=nets,
                                   vsock=vsock, shares=shares, modules=modules, test_devices=test_devices,
                                   rng=bool(self.rng), pit=bool(self.pit))

    @property
    def memory_bytes(self) -> int:
        return parse_size(self.memory)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-able data (a snapshot's manifest); `from_dict` is the inverse."""
        if self.cpuid is not None:
            raise ConfigError("cpuid: a CPUID hook is code, not data; a config with one cannot be recorded")
        c = self
        return {
            "kernel": str(c.kernel), "initrd": None if c.initrd is None else str(c.initrd),
            "cmdline": c.cmdline, "memory": c.memory_bytes, "vcpus": c.vcpus, "quirks": c.quirks,
            "entry": c.entry, "rng": bool(c.rng), "pit": bool(c.pit),
            "disks": [{"path": str(d.path), "read_only": d.read_only} for d in map(as_disk, c.disks)],
            "nets": [dataclasses.asdict(n) for n in map(as_net, c.nets)],
            "vsock": None if c.vsock is None else dataclasses.asdict(as_vsock(c.vsock)),
            "shares": [{"host_dir": str(s.host_dir), "tag": s.tag, "read_only": s.read_only,
                        "cache": CacheMode(s.cache).value} for s in c.shares if isinstance(s, ShareConfig)],
            "modules": [{"path": str(m.path), "string": m.string} for m in map(as_module, c.modules)],
            "test_devices": list(c.test_devices),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MachineConfig:
        """The config `to_dict` wrote (not validated: the files it names may be gone)."""
        try:
            return cls(
                kernel=Path(d["kernel"]), initrd=None if d["initrd"] is None else Path(d["initrd"]),
                cmdline=d["cmdline"], memory=int(d["memory"]), vcpus=int(d["vcpus"]), quirks=d["quirks"],
                entry=d["entry"], rng=bool(d.get("rng", False)), pit=bool(d.get("pit", True)),
                disks=tuple(DiskConfig(Path(x["path"]), bool(x["read_only"])) for x in d.get("disks", ())),
                nets=tuple(NetConfig(**x) for x in d.get("nets", ())),
                vsock=None if d.get("vsock") is None else VsockConfig(**d["vsock"]),
                shares=tuple(ShareConfig(Path(x["host_dir"]), x["tag"], bool(x["read_only"]), CacheMode(x["cache"]))
                             for x in d.get("shares", ())),
                modules=tuple(ModuleConfig(Path(x["path"]), x["string"]) for x in d.get("modules", ())),
                test_devices=tuple(d.get("test_devices", ())))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"machine config {d!r}: incomplete or malformed ({e})") from None


def as_disk(d: DiskConfig | str | os.PathLike[str]) -> DiskConfig:
    if isinstance(d, DiskConfig):
        return d
    if isinstance(d, str) and "," in d:
        return DiskConfig.parse(d)
    return DiskConfig(Path(d))


def as_net(n: NetConfig | str) -> NetConfig:
    if isinstance(n, NetConfig):
        return n
    return NetConfig.parse(n) if n.startswith("tap") and ("=" in n or "," in n or n == "tap") else NetConfig(tap=n)


def as_vsock(v: VsockConfig | int | str) -> VsockConfig:
    if isinstance(v, VsockConfig):
        return v
    if isinstance(v, str):
        return VsockConfig.parse(v)
    return VsockConfig(v)  # type: ignore[arg-type]


def as_module(m: ModuleConfig | tuple[str | os.PathLike[str], str]) -> ModuleConfig:
    if isinstance(m, ModuleConfig):
        return m
    path, string = m
    return ModuleConfig(Path(path), string)


__all__ = ["DEFAULT_CMDLINE", "DEFAULT_MEMORY", "MAX_CMDLINE", "ConfigError", "DiskConfig", "MachineConfig",
           "ModuleConfig", "NetConfig", "ShareConfig", "TEST_DEVICES", "VsockConfig", "memory_problem"]
