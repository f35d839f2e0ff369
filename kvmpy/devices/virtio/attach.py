"""Wiring virtio-mmio devices into a VM: MMIO windows, ioeventfd, irqfd, command line.

The one place in `kvmpy/devices/virtio/` that knows about KVM: the machine
calls `attach_virtio` once, before the vCPUs start, and boots the kernel
with the command-line words it returns (`virtio_mmio.device=4K@0x...:<gsi>`,
parsed by Linux's CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES; there is no device
tree or ACPI to announce them).

Each device gets its own 4 KiB window from `base` up and its own GSI from
`first_gsi` up, skipping 8 (RTC) and 12 (PS/2 mouse) by PC convention.
The guest programs these ISA-range IOAPIC pins edge-triggered (MP table
defaults). Linux's virtio_mmio handler reads InterruptStatus and acks
what it saw, so one pulse per interrupt is all it needs: that is what an
irqfd write does (KVM raises and lowers the GSI), and the fallback
path pulses the line with KVM_IRQ_LINE the same way.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ...bus import Bus
from ...memory import GuestMemory
from .iothread import IoThread
from .mmio import MMIO_WINDOW, MmioTransport, Register, VirtioDevice

DEFAULT_BASE = 0xD000_0000
DEFAULT_FIRST_GSI = 5
_SKIP_GSIS = (8, 12)
LAST_GSI = 15  # the ISA range; above it the MP table lists no IOAPIC entry
_clone_counter = itertools.count()


class IrqfdInterrupt:
    """An interrupt through KVM_IRQFD: one eventfd write per interrupt, no ioctl."""

    def __init__(self, vm: Any, gsi: int) -> None:
        self.vm, self.gsi = vm, gsi
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            vm.irqfd(self.fd, gsi)
        except BaseException:
            os.close(self.fd)
            raise

    def __call__(self) -> None:
        os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        if self.fd < 0:
            return
        if getattr(self.vm, "fd", -1) >= 0:
            self.vm.irqfd(self.fd, self.gsi, deassign=True)
        os.close(self.fd)
        self.fd = -1


class IrqLineInterrupt:
    """The fallback: KVM_IRQ_LINE_STATUS up then down, two ioctls per interrupt."""

    def __init__(self, vm: Any, gsi: int) -> None:
        self.vm, self.gsi = vm, gsi

    def __call__(self) -> None:
        self.vm.irq_line(self.gsi, 1)
        self.vm.irq_line(self.gsi, 0)

    def close(self) -> None:
        pass


def _serve_notifies(iothread: IoThread, transport: MmioTransport, index: int, fd: int) -> None:
    """The I/O thread serves queue `index` whenever its ioeventfd fires."""
    iothread.add_eventfd(fd, lambda: transport.notify(index))


@dataclass
class VirtioSlot:
    """One attached device: where it lives and how it is wired.

    It is also the transport's `NotifyFdOwner`: a back end in the kernel
    (vhost) claims a queue's ioeventfd, and the I/O thread stops polling
    it until released, so a guest notify goes from KVM to vhost without
    waking Python.
    """

    device: VirtioDevice
    transport: MmioTransport
    base: int
    gsi: int
    interrupt: IrqfdInterrupt | IrqLineInterrupt
    iothread: IoThread
    notify_fds: list[int] = field(default_factory=list)
    claimed: set[int] = field(default_factory=set)  # queues whose notify_fds[i] the I/O thread does not poll

    @property
    def cmdline(self) -> str:
        return f"virtio_mmio.device=4K@{self.base:#x}:{self.gsi}"

    def claim(self, index: int) -> int | None:
        """A duplicate of queue `index`'s ioeventfd, no longer polled here; None without ioeventfd."""
        if index >= len(self.notify_fds):
            return None
        fd = self.notify_fds[index]
        if index not in self.claimed:
            self.iothread.remove(fd)
            self.claimed.add(index)
        # A duplicate: the claimer's copy stays valid if set_fast_path closes ours.
        return os.dup(fd)

    def release(self, index: int) -> None:
        if index in self.claimed:
            self.claimed.discard(index)
            _serve_notifies(self.iothread, self.transport, index, self.notify_fds[index])

    def drop_notify_fds(self, vm: Any, deassign: bool) -> None:
        for i, fd in enumerate(self.notify_fds):
            self.iothread.remove(fd)
            if deassign:
                vm.ioeventfd(fd, self.base + Register.QUEUE_NOTIFY, 4, datamatch=i, deassign=True)
            os.close(fd)
        self.notify_fds.clear()
        self.claimed.clear()


@dataclass
class VirtioDevices:
    """What `attach_virtio` returns: the slots, their command-line words, and `close()`."""

    vm: Any
    bus: Bus
    iothread: IoThread
    slots: list[VirtioSlot]
    ioeventfd: bool
    irqfd: bool

    @property
    def cmdline(self) -> list[str]:
        return [s.cmdline for s in self.slots]

    def set_fast_path(self, *, ioeventfd: bool, irqfd: bool) -> None:
        """Switch every device between ioeventfd/irqfd and the fallback while the guest runs.

        A notify written during the switch either signals the eventfd or
        exits to the vCPU thread; both reach the device. Benchmarks use this to
        compare the two paths within one boot.
        """
        for s in self.slots:
            if ioeventfd and not s.notify_fds:
                _add_notify_fds(self.vm, s)
            elif not ioeventfd and s.notify_fds:
                # A back end holding a claimed ioeventfd keeps its duplicate; the notifies
                # now reach it through process_queue.
                s.drop_notify_fds(self.vm, deassign=True)
                for i in range(len(s.transport.queues)):
                    s.transport.notify(i)  # a notify the I/O thread had not read yet must not be lost
            if irqfd != isinstance(s.interrupt, IrqfdInterrupt):
                new = IrqfdInterrupt(self.vm, s.gsi) if irqfd else IrqLineInterrupt(self.vm, s.gsi)
                with s.transport.lock:
                    old, s.interrupt = s.interrupt, new
                    s.transport.interrupt = new
                old.close()
        self.ioeventfd, self.irqfd = ioeventfd, irqfd

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[None]:
        """Hold every device still (each transport's lock): the I/O thread cannot touch guest RAM meanwhile."""
        with contextlib.ExitStack() as stack:
            for s in self.slots:
                stack.enter_context(s.transport.lock)
            yield

    def snapshot_configs(self) -> list[dict]:
        """Each device's `snapshot_config()`, in attach order (= MMIO window and GSI order)."""
        return [s.device.snapshot_config() for s in self.slots]

    def close(self) -> None:
        """Unwire and close every device (call after the vCPUs stopped)."""
        vm_open = getattr(self.vm, "fd", -1) >= 0
        for s in self.slots:
            s.drop_notify_fds(self.vm, deassign=vm_open)
            with s.transport.lock:
                s.transport.reset()
                s.device.close()
            # Only now: until the device stopped, its host side (a socket, vhost's call
            # eventfd on the I/O thread) could still raise an interrupt.
            s.interrupt.close()
            self.bus.unregister(s.transport)
        self.slots.clear()

    def __enter__(self) -> VirtioDevices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _add_notify_fds(vm: Any, slot: VirtioSlot) -> None:
    """One KVM ioeventfd per queue on QueueNotify, datamatch = the queue index, served by the I/O thread."""
    for i in range(len(slot.transport.queues)):
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        slot.notify_fds.append(efd)
        vm.ioeventfd(efd, slot.base + Register.QUEUE_NOTIFY, 4, datamatch=i)
        _serve_notifies(slot.iothread, slot.transport, i, efd)


def _disk_from_snapshot(config: dict, directory: Any, force: bool) -> VirtioDevice:
    """A restored disk: read-only ones shared, every writable one on the clone's own throwaway overlay."""
    from ...storage import DiskRecord, check_disk_record, create_overlay
    from .blk import BlockDevice

    record = DiskRecord.from_dict(config["record"]) if "record" in config else None
    serial = config.get("serial")
    if config.get("snapshot_file"):
        # The VM's own overlay as it was at the snapshot, kept in the snapshot: the clone
        # writes to an overlay on it. Only the base chain can have changed since.
        if record is not None and not force:
            for rec in record.backing:
                check_disk_record(rec)
        copy = (config["snapshot_file"] if directory is None
                else os.path.join(os.fspath(directory), config["snapshot_file"]))
        # a fork's source is the parent's live overlay: the child's overlay goes on a copy of it
        return BlockDevice(create_overlay(copy, base_format="qcow2", copy_base=bool(config.get("copy_base"))),
                           serial=serial)
    if record is not None and not force:
        check_disk_record(record)  # DiskChangedError naming the file and what differs
    if config["read_only"]:
        return BlockDevice(config["path"], read_only=True, serial=serial, format=config.get("format"))
    # No write of a clone may reach the disk the snapshot was taken with, or another clone.
    return BlockDevice(create_overlay(config["path"], base_format=config.get("format")), serial=serial)


def device_from_snapshot(config: dict, *, directory: Any = None, force: bool = False) -> VirtioDevice:
    """Recreate a device from its `snapshot_config()` (kvmpy/snapshot.py's restore).

    blk: a read-only disk is reopened by path (shared); a writable one gets
    a throwaway copy-on-write overlay of its own, on the disk itself or, for
    a VM that ran on an overlay, on the snapshot's copy of that overlay in
    `directory`; a disk whose fingerprint changed since the snapshot is
    refused (`DiskChangedError`) unless `force`. net creates a fresh TAP (generated name)
    with the recorded host address or bridge and the recorded MAC; vsock
    listens on the recorded socket path, or beside it when another VM (the
    original, a sibling clone) still has it.
    """
    from ...net.tap import Tap
    from .net import NetDevice
    from .rng import EntropyDevice
    from .vsock import VsockDevice

    kind = config.get("kind")
    if kind == "blk":
        return _disk_from_snapshot(config, directory, force)
    if kind == "net":
        tap = Tap(None, host_address=config["host_address"], bridge=config["bridge"])
        try:
            return NetDevice(tap.fd, config["mac"], owner=tap, tx_offloads=bool(config["tx_offloads"]))
        except BaseException:
            tap.close()
            raise
    if kind == "rng":
        return EntropyDevice()
    if kind == "vsock":
        uds = config["uds_path"]
        if os.path.exists(uds):
            uds = f"{uds}.{os.getpid()}.{next(_clone_counter)}"
        return VsockDevice(uds, int(config["cid"]))
    raise ValueError(f"virtio device config {config!r}: unknown kind {kind!r} (blk, net, rng, vsock)")


def devices_from_snapshot(configs: Iterable[dict], *, directory: Any = None,
                          force: bool = False) -> list[VirtioDevice]:
    """`device_from_snapshot` for each, in order; on an error the devices made so far are closed."""
    made: list[VirtioDevice] = []
    try:
        for c in configs:
            made.append(device_from_snapshot(c, directory=directory, force=force))
    except BaseException:
        for dev in made:
            dev.close()
        raise
    return made


def gsis(first: int = DEFAULT_FIRST_GSI) -> Iterable[int]:
    """The GSIs devices get, in order: `first`..15 without 8 and 12."""
    return (g for g in range(first, LAST_GSI + 1) if g not in _SKIP_GSIS)


def attach_virtio(vm: Any, memory: GuestMemory, mmio_bus: Bus, devices: Iterable[VirtioDevice], *,
                  iothread: IoThread, base: int = DEFAULT_BASE, first_gsi: int = DEFAULT_FIRST_GSI,
                  ioeventfd: bool = True, irqfd: bool = True) -> VirtioDevices:
    """Place each device in its own MMIO window with its own GSI and wire it to KVM.

    `ioeventfd=False` / `irqfd=False` select the slow paths (QueueNotify as
    an MMIO exit served on the vCPU thread; interrupts by KVM_IRQ_LINE), for
    benchmarks and for hosts without those capabilities.
    """
    devices = list(devices)
    free = list(gsis(first_gsi))
    if len(devices) > len(free):
        raise ValueError(f"{len(devices)} virtio devices but only {len(free)} GSIs from {first_gsi} to "
                         f"{LAST_GSI}; lower first_gsi or attach fewer devices")
    attached = VirtioDevices(vm, mmio_bus, iothread, [], ioeventfd, irqfd)
    try:
        for n, (device, gsi) in enumerate(zip(devices, free)):
            where = base + n * MMIO_WINDOW
            interrupt = IrqfdInterrupt(vm, gsi) if irqfd else IrqLineInterrupt(vm, gsi)
            transport = MmioTransport(device, memory, interrupt)
            slot = VirtioSlot(device, transport, where, gsi, interrupt, iothread)
            transport.notify_owner = slot
            attached.slots.append(slot)
            mmio_bus.register(where, MMIO_WINDOW, transport, f"virtio-{device.name}")
            if ioeventfd:
                _add_notify_fds(vm, slot)
            device.start_io(iothread)
        iothread.start()
    except BaseException:
        attached.close()
        raise
    return attached


__all__ = ["DEFAULT_BASE", "DEFAULT_FIRST_GSI", "IrqLineInterrupt", "IrqfdInterrupt", "VirtioDevices",
           "VirtioSlot", "attach_virtio", "device_from_snapshot", "devices_from_snapshot", "gsis"]
