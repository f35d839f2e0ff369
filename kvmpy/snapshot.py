"""Snapshots of a paused `Machine`, and restoring them into new VMs.

A snapshot is a directory:

    manifest.json   format name and version, kvmpy version, struct sizes, the
                    machine config, the memory layout, and size + SHA-256 of
                    every other file
    memory.bin      guest RAM, the regions one after another (page aligned)
    state.json      vCPUs (regs, sregs, FPU, every MSR of KVM_GET_MSR_INDEX_LIST,
                    LAPIC, vcpu events, MP state, debug registers, XCRs, XSAVE),
                    the VM (PIC master/slave and IOAPIC, PIT2, kvmclock), every
                    device's `snapshot_state()`, and kvmpy's own state (the
                    syscall trap's per-vCPU guest LSTAR and kernel CS)
    console.log     what the guest printed so far (the console continues from it)

KVM structures are stored as their raw bytes (base64), with their sizes in
the manifest: a snapshot from a build whose <linux/kvm.h> lays them out
differently, or from another format version, is refused, as is any file
whose size or checksum does not match.

Restore maps memory.bin MAP_PRIVATE: clones of one snapshot share its page
cache pages until they write, so starting one costs a few ioctls and page
faults, not a copy of the guest's RAM. `Snapshot.open` verifies the files
once; `restore_machine` can then clone from it many times.

Devices take part through a protocol: `snapshot_state() -> dict` (JSON-able)
and `restore_state(dict)`. Every device on the machine's buses must have
both, or `take_snapshot` refuses and names it. The state is recorded in the
order KVM's migration documents ask for on restore (KVM API document,
KVM_SET_MSRS/KVM_SET_LAPIC notes; Firecracker's vstate/vcpu order): MP
state, regs, sregs, XSAVE/FPU, XCRs, debug registers, LAPIC, MSRs, events.

Virtio devices (format version 2): the manifest's config lists each
device's `snapshot_config()` in attach order (a disk's image path, a NIC's
MAC and TAP host address, the vsock CID and socket path); the transport's
`snapshot_state()` holds the registers, negotiated features and queue
positions. Restore recreates the devices from that list (a fresh TAP for
each NIC, the disk image reopened, not copied), the new `Machine` attaches
them with ioeventfd/irqfd as at boot, and their state is loaded before
any vCPU runs. A vsock device with open connections refuses a snapshot,
and one on the kernel's vhost-vsock always does (the kernel holds its state).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import mmap
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import __version__
from ._ioctl import ioctl
from ._kvm import ffi, lib
from .errors import KvmError, KvmIoctlError
from .memory import PAGE_SIZE, GuestMemory

FORMAT = "kvmpy-snapshot"
FORMAT_VERSION = 2  # 2: virtio devices (their configs in the manifest, their state in state.json)
MANIFEST = "manifest.json"
MEMORY_FILE = "memory.bin"
STATE_FILE = "state.json"
CONSOLE_FILE = "console.log"

# The KVM structures stored as raw bytes; their sizes guard the layout.
STRUCTS = {
    "regs": "struct kvm_regs", "sregs": "struct kvm_sregs", "fpu": "struct kvm_fpu",
    "lapic": "struct kvm_lapic_state", "vcpu_events": "struct kvm_vcpu_events",
    "debugregs": "struct kvm_debugregs", "xsave": "struct kvm_xsave", "irqchip": "struct kvm_irqchip",
    "pit2": "struct kvm_pit_state2", "clock": "struct kvm_clock_data",
}
IRQCHIPS = {"pic_master": lib.KVM_IRQCHIP_PIC_MASTER, "pic_slave": lib.KVM_IRQCHIP_PIC_SLAVE,
            "ioapic": lib.KVM_IRQCHIP_IOAPIC}
_CHUNK = 8 << 20


class SnapshotError(KvmError):
    """A snapshot cannot be taken, read or restored; the message says which file and why."""


class SnapshotVersionError(SnapshotError):
    """The snapshot was written by another format version or an incompatible kvmpy build."""


class SnapshotCorruptError(SnapshotError):
    """A snapshot file is missing, truncated, or does not match its checksum."""


def struct_sizes() -> dict[str, int]:
    return {name: ffi.sizeof(ctype) for name, ctype in STRUCTS.items()}


def _blob(obj: Any) -> str:
    return base64.b64encode(bytes(ffi.buffer(obj))).decode()


def _unblob(name: str, text: str) -> Any:
    obj = ffi.new(STRUCTS[name] + " *")
    data = base64.b64decode(text)
    if len(data) != ffi.sizeof(obj[0]):
        raise SnapshotVersionError(f"{name}: {len(data)} bytes stored, this build's {STRUCTS[name]} "
                                   f"has {ffi.sizeof(obj[0])}")
    ffi.buffer(obj)[:] = data
    return obj


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# -- the on-disk format ------------------------------------------------------------

@dataclass
class SnapshotData:
    """Everything in a snapshot, in memory (the memory as buffers to write)."""

    config: dict
    regions: list[tuple[int, Any]]  # (gpa, buffer of the region's bytes)
    state: dict
    console: bytes = b""
    meta: dict = field(default_factory=dict)

    def write(self, directory: str | os.PathLike[str]) -> Path:
        """Write the snapshot files, the manifest last (a directory without one is no snapshot)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / MANIFEST).unlink(missing_ok=True)
        layout = []
        offset = 0
        h = hashlib.sha256()
        with open(d / MEMORY_FILE, "wb") as f:
            for gpa, buf in self.regions:
                view = memoryview(buf).cast("B")
                size = len(view)
                if size % PAGE_SIZE:
                    raise SnapshotError(f"memory region at {gpa:#x} of {size:#x} bytes is not page aligned")
                for i in range(0, size, _CHUNK):
                    part = view[i:i + _CHUNK]
                    f.write(part)
                    h.update(part)
                layout.append({"gpa": gpa, "size": size, "offset": offset})
                offset += size
        files = {MEMORY_FILE: {"size": offset, "sha256": h.hexdigest()}}
        for name, data in ((STATE_FILE, json.dumps(self.state, sort_keys=True).encode()),
                           (CONSOLE_FILE, bytes(self.console))):
            (d / name).write_bytes(data)
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "kvmpy_version": __version__,
            "created": time.time(), "struct_sizes": struct_sizes(), "config": self.config,
            "memory": layout, "files": files, "meta": self.meta,
        }
        tmp = d / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        tmp.replace(d / MANIFEST)
        return d


@dataclass
class Snapshot:
    """A snapshot directory whose manifest was read and whose files were checked."""

    directory: Path
    manifest: dict
    state: dict
    console: bytes

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *, verify_memory: bool = True) -> Snapshot:
        """Read and check a snapshot: format, version, struct sizes, file sizes and checksums.

        `verify_memory=False` skips hashing memory.bin (its size is still
        checked): for a snapshot this process wrote or verified itself.
        """
        d = Path(directory)
        mpath = d / MANIFEST
        try:
            manifest = json.loads(mpath.read_text())
        except FileNotFoundError:
            raise SnapshotCorruptError(f"{d}: no {MANIFEST}; not a kvmpy snapshot (or an unfinished one)") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise SnapshotCorruptError(f"{mpath}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise SnapshotCorruptError(f"{mpath}: not a kvmpy snapshot manifest")
        version = manifest.get("version")
        if version != FORMAT_VERSION:
            raise SnapshotVersionError(
                f"{d}: snapshot format version {version} (written by kvmpy {manifest.get('kvmpy_version')}); "
                f"this kvmpy {__version__} reads version {FORMAT_VERSION} only")
        if manifest.get("struct_sizes") != struct_sizes():
            raise SnapshotVersionError(
                f"{d}: KVM structure sizes {manifest.get('struct_sizes')} differ from this build's "
                f"{struct_sizes()}; the snapshot comes from an incompatible kvmpy build")
        try:
            files = manifest["files"]
            for name in (MEMORY_FILE, STATE_FILE, CONSOLE_FILE):
                cls._check_file(d / name, files[name], hash_it=name != MEMORY_FILE or verify_memory)
            if sum(r["size"] for r in manifest["memory"]) != files[MEMORY_FILE]["size"]:
                raise SnapshotCorruptError(f"{d / MANIFEST}: memory layout does not add up to {MEMORY_FILE}")
        except (KeyError, TypeError) as e:
            raise SnapshotCorruptError(f"{mpath}: incomplete manifest (missing {e})") from None
        state = json.loads((d / STATE_FILE).read_bytes())
        return cls(d, manifest, state, (d / CONSOLE_FILE).read_bytes())

    @staticmethod
    def _check_file(path: Path, expect: dict, *, hash_it: bool) -> None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise SnapshotCorruptError(f"{path}: missing") from None
        if size != expect["size"]:
            raise SnapshotCorruptError(f"{path}: {size} bytes, the manifest says {expect['size']} (truncated?)")
        if hash_it and _sha256_file(path) != expect["sha256"]:
            raise SnapshotCorruptError(f"{path}: SHA-256 does not match the manifest; the file is corrupted")

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    def map_memory(self) -> GuestMemory:
        """Guest memory backed copy-on-write by memory.bin (MAP_PRIVATE): clones share pages."""
        mem = GuestMemory(0)
        fd = os.open(self.directory / MEMORY_FILE, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for r in self.manifest["memory"]:
                m = mmap.mmap(fd, r["size"], flags=mmap.MAP_PRIVATE,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=r["offset"])
                mem.add_region(r["gpa"], r["size"], mapping=m)
        except BaseException:
            mem.close()
            raise
        finally:
            os.close(fd)
        return mem


# -- capturing and loading KVM state -------------------------------------------------

def _get_msrs(vcpu: Any, indices: list[int]) -> dict[int, int]:
    """KVM_GET_MSRS over the whole list, skipping an MSR KVM cannot read instead of stopping there."""
    values: dict[int, int] = {}
    todo = list(indices)
    while todo:
        got = vcpu.get_msrs(todo)
        values.update(got)
        todo = todo[len(got) + 1:]  # the first one not returned failed; go on after it
    return values


def _set_msrs(vcpu: Any, values: dict[int, int]) -> list[int]:
    """KVM_SET_MSRS of everything; returns the MSRs KVM refused (read-only ones, typically)."""
    refused = []
    items = list(values.items())
    while items:
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
        for e, (i, v) in zip(msrs.entries[0:len(items)], items):
            e.index, e.data = i, v
        n = ioctl(vcpu.fd, "KVM_SET_MSRS", msrs, f"vcpu {vcpu.id}")
        if n < len(items):
            refused.append(items[n][0])
        items = items[n + 1:]
    return refused


def capture_vcpu(vcpu: Any, msr_indices: list[int], *, xsave: bool, xcrs: bool) -> dict:
    s: dict[str, Any] = {
        "id": vcpu.id,
        "mp_state": vcpu.get_mp_state(),
        "regs": _blob(vcpu.get_regs()),
        "sregs": _blob(vcpu.get_sregs()),
        "fpu": _blob(vcpu.get_fpu()),
        "debugregs": _blob(vcpu.get_debugregs()),
        "lapic": _blob(vcpu.get_lapic()),
        "msrs": {f"{k:#x}": v for k, v in _get_msrs(vcpu, msr_indices).items()},
        "vcpu_events": _blob(vcpu.get_vcpu_events()),
    }
    if xsave:
        s["xsave"] = base64.b64encode(vcpu.get_xsave()).decode()
    if xcrs:
        s["xcrs"] = {str(k): v for k, v in vcpu.get_xcrs().items()}
    return s


def load_vcpu(vcpu: Any, s: dict) -> list[int]:
    """Set a vCPU's state in the order KVM wants; returns MSRs KVM refused to set."""
    vcpu.set_mp_state(s["mp_state"])
    vcpu.set_regs(_unblob("regs", s["regs"]))
    vcpu.set_sregs(_unblob("sregs", s["sregs"]))
    if "xsave" in s:
        vcpu.set_xsave(base64.b64decode(s["xsave"]))
    else:
        vcpu.set_fpu(_unblob("fpu", s["fpu"]))
    if "xcrs" in s:
        vcpu.set_xcrs({int(k): v for k, v in s["xcrs"].items()})
    vcpu.set_debugregs(_unblob("debugregs", s["debugregs"]))
    vcpu.set_lapic(_unblob("lapic", s["lapic"]))  # before the MSRs: TSC deadline needs the LAPIC mode
    refused = _set_msrs(vcpu, {int(k, 16): v for k, v in s["msrs"].items()})
    vcpu.set_vcpu_events(_unblob("vcpu_events", s["vcpu_events"]))
    return refused


def capture_vm(vm: Any) -> dict:
    clock = vm.get_clock()
    return {
        "irqchip": {name: _blob(vm.get_irqchip(chip)) for name, chip in IRQCHIPS.items()},
        "pit2": _blob(vm.get_pit2()),
        "clock": clock.clock,
    }


def load_vm(vm: Any, s: dict) -> None:
    for name in IRQCHIPS:
        vm.set_irqchip(_unblob("irqchip", s["irqchip"][name]))
    vm.set_pit2(_unblob("pit2", s["pit2"]))
    vm.set_clock(int(s["clock"]))


def _state_of(key: str, dev: Any) -> dict:
    from .devices.virtio.mmio import SnapshotRefused
    try:
        return dev.snapshot_state()
    except SnapshotRefused as e:
        raise SnapshotError(f"cannot snapshot {key}: {e}") from None


def _restore(dev: Any, state: dict) -> None:
    dev.restore_state(state)


def _snapshottable(dev: Any) -> bool:
    return hasattr(dev, "snapshot_state") and hasattr(dev, "restore_state")


def device_key(bus: str, r: Any) -> str:
    return f"{bus}:{r.base:#x}:{r.name}"


def _devices(machine: Any) -> list[tuple[str, Any]]:
    out, seen = [], set()
    for bus_name, bus in (("pio", machine.pio), ("mmio", machine.mmio)):
        for r in bus.ranges:
            if id(r.device) in seen:
                continue
            seen.add(id(r.device))
            out.append((device_key(bus_name, r), r.device))
    return out


def _virtio_configs(machine: Any) -> list[dict]:
    """Each virtio device's `snapshot_config()`, in attach order (= MMIO window and GSI order)."""
    from .devices.virtio.mmio import SnapshotRefused
    out = []
    for dev in machine.config.devices:
        try:
            out.append(dev.snapshot_config())
        except SnapshotRefused as e:
            raise SnapshotError(f"cannot snapshot: {e}") from None
    return out


# -- machines -----------------------------------------------------------------------

def _has_cap(kvm: Any, name: str) -> bool:
    return bool(kvm.check_extension(getattr(lib, name)))


def take_snapshot(machine: Any, directory: str | os.PathLike[str], *, meta: dict | None = None) -> Path:
    """Write a snapshot of a paused `Machine` into `directory`.

    Refuses (SnapshotError) while vCPUs run, when a device lacks
    `snapshot_state`/`restore_state` (naming the device), and for a machine
    with a custom CPUID table or no PIT.
    """
    if not getattr(machine, "paused", False):
        raise SnapshotError("the machine must be paused (Machine.pause()) before a snapshot")
    config = machine.config
    if config.cpuid is not None or not config.pit:
        # The snapshot records the config a restore rebuilds the machine from; these two
        # (the kvm-unit-tests runner's) are not in it, and a restore without them would differ.
        raise SnapshotError("cannot snapshot a machine with a custom CPUID table (MachineConfig.cpuid) "
                            "or without a PIT (MachineConfig.pit=False)")
    devices = _devices(machine)
    missing = [k for k, dev in devices if not _snapshottable(dev)]
    if missing:
        raise SnapshotError("cannot snapshot: device(s) " + ", ".join(missing) +
                            " have no snapshot_state()/restore_state()")
    virtio_configs = _virtio_configs(machine)  # first: a device that cannot be recreated refuses here
    kvm = machine.kvm
    msr_indices = kvm.get_msr_index_list()
    xsave, xcrs = _has_cap(kvm, "KVM_CAP_XSAVE"), _has_cap(kvm, "KVM_CAP_XCRS")
    with contextlib.ExitStack() as quiet:
        # The vCPUs are paused, but the I/O thread would go on receiving into guest
        # RAM: holding every transport's lock keeps device state and memory.bin consistent.
        virtio = getattr(machine, "virtio", None)
        for slot in (virtio.slots if virtio is not None else ()):
            quiet.enter_context(slot.transport.lock)
        return _write_snapshot(machine, directory, meta, virtio_configs, msr_indices, xsave, xcrs)


def _write_snapshot(machine: Any, directory: str | os.PathLike[str], meta: dict | None, virtio: list[dict],
                    msr_indices: list[int], xsave: bool, xcrs: bool) -> Path:
    devices = _devices(machine)
    trap = machine.syscall_trap
    state = {
        "vcpus": [capture_vcpu(v, msr_indices, xsave=xsave, xcrs=xcrs) for v in machine.vcpus],
        "vm": capture_vm(machine.vm),
        "devices": {k: _state_of(k, dev) for k, dev in devices},
        "kvmpy": {
            "syscall_trap": None if trap is None else {
                "guest_lstar": {str(k): v for k, v in trap.guest_lstar.items()},
                "kernel_cs": {str(k): v for k, v in trap.kernel_cs.items()},
                "traps": trap.traps,
            },
            "console_offset": len(machine.console.data),
            "scan_from": machine._scan_from,
        },
    }
    c = machine.config
    config = {"kernel": str(c.kernel), "initrd": None if c.initrd is None else str(c.initrd),
              "cmdline": c.cmdline, "memory": c.memory, "cpus": c.cpus, "quirks": c.quirks, "entry": c.entry,
              "virtio": virtio}
    with machine.console.cond:
        console = bytes(machine.console.data)
    data = SnapshotData(config, [(r.gpa, r.mapping) for r in machine.memory], state, console, dict(meta or {}))
    return data.write(directory)


@dataclass
class RestoreReport:
    """What `restore_machine` did and how long it took."""

    seconds: float
    refused_msrs: dict[int, list[int]]


def restore_machine(snapshot: Snapshot | str | os.PathLike[str], *,
                    console: Callable[[bytes], None] | None = None, kvm: Any = None) -> tuple[Any, RestoreReport]:
    """A new `Machine` in the snapshot's state, its vCPUs not yet started: call `start()`."""
    from .devices.virtio.attach import devices_from_snapshot
    from .devices.virtio.mmio import SnapshotRefused
    from .machine import Machine, MachineConfig  # the machine layer sits above this module's users

    t0 = time.perf_counter()
    snap = snapshot if isinstance(snapshot, Snapshot) else Snapshot.open(snapshot)
    c = snap.config
    config = MachineConfig(kernel=Path(c["kernel"]), initrd=None if c["initrd"] is None else Path(c["initrd"]),
                           cmdline=c["cmdline"], memory=int(c["memory"]), cpus=int(c["cpus"]),
                           quirks=c["quirks"], entry=c["entry"])
    # Devices first (a missing disk image or a TAP that cannot be made fails before
    # any VM exists); Machine attaches them, wiring ioeventfd/irqfd as at boot.
    config.devices = devices_from_snapshot(c["virtio"])
    memory = snap.map_memory()
    try:
        machine = Machine(config, console=console, kvm=kvm, memory=memory)
    except BaseException:
        memory.close()
        for dev in config.devices:
            dev.close()
        raise
    try:
        state = snap.state
        if len(state["vcpus"]) != len(machine.vcpus):
            raise SnapshotCorruptError(f"{snap.directory}: {len(state['vcpus'])} vCPU states for "
                                       f"{len(machine.vcpus)} vCPUs")
        load_vm(machine.vm, state["vm"])
        refused = {}
        for vcpu, s in zip(machine.vcpus, state["vcpus"]):
            refused[vcpu.id] = load_vcpu(vcpu, s)
        devices = dict(_devices(machine))
        for key, dstate in state["devices"].items():
            dev = devices.get(key)
            if dev is None:
                raise SnapshotError(f"{snap.directory}: snapshot has device {key}, the restored machine "
                                    f"has only {sorted(devices)}")
            try:
                _restore(dev, dstate)
            except SnapshotRefused as e:
                raise SnapshotError(f"{snap.directory}: restoring {key}: {e}") from None
        k = state["kvmpy"]
        trap = k["syscall_trap"]
        if (trap is None) != (machine.syscall_trap is None):
            raise SnapshotError(f"{snap.directory}: the snapshot was taken with the syscall trap "
                                f"{'off' if trap is None else 'on'}; this host's quirks differ")
        if trap is not None:
            machine.syscall_trap.guest_lstar = {int(a): b for a, b in trap["guest_lstar"].items()}
            machine.syscall_trap.kernel_cs = {int(a): b for a, b in trap["kernel_cs"].items()}
            machine.syscall_trap.traps = trap["traps"]
        machine.console.data += snap.console[:k["console_offset"]]
        machine._scan_from = k["scan_from"]
    except KvmIoctlError as e:
        machine.close()
        raise SnapshotError(f"{snap.directory}: restoring state failed: {e}") from e
    except BaseException:
        machine.close()
        raise
    return machine, RestoreReport(time.perf_counter() - t0, refused)


__all__ = ["FORMAT_VERSION", "RestoreReport", "Snapshot", "SnapshotCorruptError", "SnapshotData",
           "SnapshotError", "SnapshotVersionError", "restore_machine", "take_snapshot"]
