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

This module is only the on-disk format. What goes into state.json is the
machine's `MachineState` (kvmpy/machine/state.py): every component saves
and restores its own part (`snapshot_state()` / `restore_state()`): each
vCPU in the order KVM's migration notes ask for, the VM's irqchip, PIT and
clock, every device on the buses, the MSR filter, the syscall trap, the
console. KVM structures are stored as their raw bytes (base64, kvmpy/blobs.py),
with their sizes in the manifest: a snapshot from a build whose <linux/kvm.h>
lays them out differently, or from another format version, is refused, as
is any file whose size or checksum does not match.

The manifest's config is the machine's `MachineConfig.to_dict()` plus
each virtio device's `snapshot_config()` in attach order (a disk's image
path, a NIC's MAC and TAP host address, the vsock CID and socket path).
Restore recreates the devices from that list (a fresh TAP for each NIC, the
disk image reopened, not copied), `kvmpy.machine.restore` attaches them
with ioeventfd/irqfd as at boot, and every state is loaded before any vCPU
runs. A vsock device with open connections keeps them; its restored copy
resets its guest's transport. One on the kernel's vhost-vsock always
refuses (the kernel holds its state).

Restore maps memory.bin MAP_PRIVATE: clones of one snapshot share its page
cache pages until they write, so starting one costs a few ioctls and page
faults, not a copy of the guest's RAM. `Snapshot.open` verifies the files
once; `restore_machine` can then clone from it many times.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .blobs import struct_sizes
from .devices.virtio.attach import devices_from_snapshot
from .devices.virtio.mmio import SnapshotRefused
from .errors import KvmIoctlError, SnapshotCorruptError, SnapshotError, SnapshotVersionError
from .machine import Machine, MachineConfig, MachineState, device_configs, restore
from .memory import PAGE_SIZE, GuestMemory

FORMAT = "kvmpy-snapshot"
FORMAT_VERSION = 3  # 2: virtio devices; 3: one MachineConfig in the manifest, component-owned state
MANIFEST = "manifest.json"
MEMORY_FILE = "memory.bin"
STATE_FILE = "state.json"
CONSOLE_FILE = "console.log"

_CHUNK = 8 << 20


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
    files: dict[str, Path] = field(default_factory=dict)  # more files to copy in: {name in the snapshot: source}
    parent: dict | None = None  # an incremental snapshot's parent (kvmpy/snapshot_chain.py)

    def write(self, directory: str | os.PathLike[str]) -> Path:
        """Write the snapshot atomically: all of it appears at `directory`, or nothing changes there.

        The files go into a sibling temporary directory, each fsynced, the
        manifest last; then one rename publishes it (renameat2 RENAME_EXCHANGE
        swaps it with a snapshot already there, which is then removed). A
        process killed at any point leaves the previous snapshot whole and a
        partial directory without a manifest, which `Snapshot.open` refuses.
        """
        d = Path(directory)
        existing = d.exists()
        if existing and not (d.is_dir() and (not any(d.iterdir()) or (d / MANIFEST).exists())):
            raise SnapshotError(f"{d}: exists and is not a kvmpy snapshot; choose a new or empty directory")
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.partial-", dir=d.parent))
        try:
            self._write_files(tmp)
            if existing:
                _exchange(tmp, d)  # tmp now holds the previous snapshot
                shutil.rmtree(tmp)
            else:
                os.rename(tmp, d)
            _fsync_dir(d.parent)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = "the previous snapshot there is intact" if existing else "nothing was written there"
            raise SnapshotError(f"{d}: cannot write the snapshot ({e.strerror or e}); {kept}") from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return d

    def _write_files(self, d: Path) -> None:
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
            f.flush()
            os.fsync(f.fileno())
        files = {MEMORY_FILE: {"size": offset, "sha256": h.hexdigest()}}
        for name, data in ((STATE_FILE, json.dumps(self.state, sort_keys=True).encode()),
                           (CONSOLE_FILE, bytes(self.console))):
            _write_synced(d / name, data)
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, source in self.files.items():
            shutil.copyfile(source, d / name)
            with open(d / name, "rb+") as f:
                os.fsync(f.fileno())
            files[name] = {"size": (d / name).stat().st_size, "sha256": _sha256_file(d / name)}
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "kvmpy_version": __version__,
            "created": time.time(), "struct_sizes": struct_sizes(), "config": self.config,
            "memory": layout, "files": files, "meta": self.meta,
        }
        if self.parent is not None:
            manifest["parent"] = self.parent
        _write_synced(d / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        _fsync_dir(d)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2  # <linux/fs.h>
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> None:
    """Swap two directories atomically (renameat2(2) RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2 RENAME_EXCHANGE: {os.strerror(err)}", str(b))


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
            for name in set(files) - {MEMORY_FILE, STATE_FILE, CONSOLE_FILE}:  # the disks' overlays
                cls._check_file(d / name, files[name], hash_it=True)
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
        """Guest memory backed copy-on-write by memory.bin (MAP_PRIVATE): clones share pages.

        An incremental snapshot's memory is its chain's (`map_chain`: its base's, each child's pages over it).
        """
        if self.manifest.get("parent") is not None:
            return map_chain(self)
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


# -- chains of incremental snapshots (written by kvmpy/snapshot_chain.py) ---------------
MAX_CHAIN = 256  # a deeper chain is a loop or a mistake; merge() it


def manifest_digest(directory: Path) -> str:
    return hashlib.sha256((directory / MANIFEST).read_bytes()).hexdigest()


def chain(snap: Snapshot) -> list[Snapshot]:
    """`snap` and its ancestors, newest first, each opened and checked against what its child recorded."""
    out = [snap]
    seen = {snap.directory.resolve()}
    while (info := out[-1].manifest.get("parent")) is not None:
        child = out[-1].directory
        try:
            path = (child / info["path"]).resolve()
            digest = info["manifest_sha256"]
        except (KeyError, TypeError):
            raise SnapshotCorruptError(f"{child / MANIFEST}: incomplete parent entry {info!r}") from None
        if path in seen or len(out) > MAX_CHAIN:
            raise SnapshotCorruptError(f"{child}: the snapshot chain loops or is deeper than {MAX_CHAIN} "
                                       "(merge it into a full snapshot)")
        seen.add(path)
        if not (path / MANIFEST).exists():
            raise SnapshotCorruptError(f"{child}: its parent snapshot {path} is missing")
        if manifest_digest(path) != digest:
            raise SnapshotCorruptError(f"{child}: its parent {path} is not the snapshot it was taken from "
                                       "(the manifest's digest differs: replaced or rewritten)")
        out.append(Snapshot.open(path))
    return out


def map_chain(snap: Snapshot) -> GuestMemory:
    """The memory of an incremental snapshot: its base's mapped MAP_PRIVATE, each child's pages over it."""
    snaps = chain(snap)
    base = snaps[-1]
    layout = [{"gpa": r["gpa"], "size": r["size"]} for r in base.manifest["memory"]]
    for s in snaps[:-1]:
        if s.manifest["parent"].get("regions") != layout:
            raise SnapshotCorruptError(f"{s.directory}: its memory layout differs from its base {base.directory}'s")
    mem = base.map_memory()
    try:
        for s in reversed(snaps[:-1]):
            fd = os.open(s.directory / MEMORY_FILE, os.O_RDONLY | os.O_CLOEXEC)
            try:
                for run in s.manifest["memory"]:
                    view = mem.view(run["gpa"], run["size"])
                    if os.preadv(fd, [view], run["offset"]) != run["size"]:
                        raise SnapshotCorruptError(f"{s.directory / MEMORY_FILE}: short read at {run['offset']}")
            finally:
                os.close(fd)
    except BaseException:
        mem.close()
        raise
    return mem


# -- machines -----------------------------------------------------------------------

def take_snapshot(machine: Machine, directory: str | os.PathLike[str], *, meta: dict | None = None,
                  then: Callable[[Path], None] | None = None) -> Path:
    """Write a snapshot of a paused `Machine` into `directory`.

    The machine gathers its components' states (`Machine.snapshot_state`);
    this only lays them out. Refuses (SnapshotError) while vCPUs run, when a
    device cannot be saved or recreated (naming it), and for a machine with a
    custom CPUID table or no PIT.
    """
    if machine.state not in ("paused", "created"):
        raise SnapshotError(f"the machine is {machine.state}; pause it (Machine.pause()) before a snapshot")
    with machine.quiesced():  # the state, memory.bin and the disks must be of one instant
        try:
            virtio = machine.virtio.snapshot_configs() if machine.virtio is not None else []
        except SnapshotRefused as e:  # first: a device that cannot be recreated refuses here
            raise SnapshotError(f"cannot snapshot: {e}") from None
        state = machine.snapshot_state()  # refuses what a restore could not rebuild
        config = machine.config.to_dict()
        config["virtio"] = virtio
        data = SnapshotData(config, [(r.gpa, r.mapping) for r in machine.memory], state.to_dict(),
                            machine.console.contents(), dict(meta or {}), disk_files(virtio))
        written = data.write(directory)
        if then is not None:
            then(written)  # still quiesced: incremental tracking starts at exactly this memory
        return written


def disk_files(virtio: list[dict]) -> dict[str, Path]:
    """The files a snapshot keeps beside its memory: for a disk on an overlay, the overlay as it is now
    (it holds only the VM's writes), so clones start from it while the VM writes on. Marks each such
    device config with its `snapshot_file`."""
    files = {}
    for i, dev in enumerate(virtio):
        if dev.get("kind") == "blk" and "overlay" in dev:
            dev["snapshot_file"] = f"disk{i}.qcow2"
            files[dev["snapshot_file"]] = Path(dev["overlay"]["file"])
    return files


def kept_files(snap: Snapshot) -> dict[str, Path]:
    """The files of `snap` beyond memory, state and console (disk overlays), to carry into a copy of it."""
    return {name: snap.directory / name for name in snap.manifest["files"]
            if name not in (MEMORY_FILE, STATE_FILE, CONSOLE_FILE)}


@dataclass
class RestoreReport:
    """What `restore_machine` did and how long it took."""

    seconds: float
    refused_msrs: dict[int, list[int]]


def restore_machine(snapshot: Snapshot | str | os.PathLike[str], *,
                    console: Callable[[bytes], None] | None = None, kvm: Any = None,
                    force_disks: bool = False, memory: GuestMemory | None = None) -> tuple[Machine, RestoreReport]:
    """A new `Machine` in the snapshot's state, its vCPUs not yet started: call `start()`.

    Each writable disk gets a throwaway overlay of the clone's own; a disk
    that changed since the snapshot (its fingerprint) is refused
    (`DiskChangedError`) unless `force_disks`. `memory`: guest RAM already
    holding (or serving) the snapshot's, instead of memory.bin mapped
    MAP_PRIVATE (kvmpy/lazy.py's userfaultfd-backed memory).
    """
    t0 = time.perf_counter()
    snap = snapshot if isinstance(snapshot, Snapshot) else Snapshot.open(snapshot)
    recorded = dict(snap.config)
    virtio = recorded.pop("virtio", [])
    base = MachineConfig.from_dict(recorded)
    state = MachineState.from_dict(snap.state)
    # Devices first (a missing disk image or a TAP that cannot be made fails before
    # any VM exists); the builder attaches them, wiring ioeventfd/irqfd as at boot.
    devices = devices_from_snapshot(virtio, directory=snap.directory, force=force_disks)
    config = dataclasses.replace(base, **device_configs(devices))
    try:
        memory = snap.map_memory() if memory is None else memory
    except BaseException:
        for dev in devices:
            dev.close()
        raise
    try:
        machine, refused = restore(config, state, memory, console_log=snap.console, devices=devices,
                                   console=console, kvm=kvm)
    except KvmIoctlError as e:
        raise SnapshotError(f"{snap.directory}: restoring state failed: {e}") from e
    except SnapshotError as e:
        raise SnapshotError(f"{snap.directory}: {e}") from None
    return machine, RestoreReport(time.perf_counter() - t0, refused)


__all__ = ["FORMAT_VERSION", "RestoreReport", "Snapshot", "SnapshotCorruptError", "SnapshotData",
           "SnapshotError", "SnapshotVersionError", "restore_machine", "take_snapshot"]
