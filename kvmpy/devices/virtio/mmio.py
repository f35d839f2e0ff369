"""The virtio-mmio transport, version 2 ("modern"), virtio 1.2 section 4.2.

`MmioTransport` is the bus `Device` for one 4 KiB MMIO window: it keeps the
registers the driver programs (features, queues, status) and hands queue
work to a `VirtioDevice` (block, net, entropy, vsock). The device never sees
the registers; the transport never sees a request.

Threads: register accesses come from vCPU threads (MMIO exits); queue
notifications come from the I/O thread (ioeventfd) or, without ioeventfd,
from the vCPU thread that wrote QueueNotify. One `RLock` per transport
serialises them, so a reset never races a request.

Untrusted guest: a broken ring, or anything unexpected while a device
works on a queue, puts the device in DEVICE_NEEDS_RESET (2.1.2) with a
configuration-change interrupt, and the device stops touching its queues
until the driver resets it. Nothing raised by device code leaves `notify`.
"""

from __future__ import annotations

import enum
import logging
import threading
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from ...errors import GuestMemoryError, KvmError
from ...memory import GuestMemory
from .queue import ChainError, DescriptorChain, QueueError, Virtqueue

if TYPE_CHECKING:
    from .iothread import IoThread

log = logging.getLogger("kvmpy.virtio")

MMIO_WINDOW = 0x1000  # one page per device, as the command-line format "4K@..." says
MAGIC_VALUE = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x4B564D50  # "KVMP"


class Register(enum.IntEnum):
    """virtio-mmio register offsets (4.2.2, table "MMIO Device Register Layout")."""

    MAGIC_VALUE = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    SHM_SEL = 0x0AC
    SHM_LEN_LOW = 0x0B0
    SHM_LEN_HIGH = 0x0B4
    SHM_BASE_LOW = 0x0B8
    SHM_BASE_HIGH = 0x0BC
    CONFIG_GENERATION = 0x0FC
    CONFIG = 0x100


class DeviceStatus(enum.IntFlag):
    """Device status field bits (2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


class DeviceId(enum.IntEnum):
    """Device IDs (5)."""

    NET = 1
    BLOCK = 2
    ENTROPY = 4
    VSOCK = 19
    FS = 26


class InterruptStatus(enum.IntFlag):
    USED_BUFFER = 1
    CONFIG_CHANGE = 2


# Reserved feature bits (6)
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32


class SnapshotRefused(KvmError):
    """A device cannot be snapshotted in its present state (the message says why)."""


class NotifyFdOwner(Protocol):
    """Who polls each queue's QueueNotify eventfd (attach_virtio's slot): lets a back end outside kvmpy take one."""

    def claim(self, index: int) -> int | None: ...

    def release(self, index: int) -> None: ...


class VirtioDevice:
    """What a device type implements; the transport calls it with its lock held.

    Subclasses set `device_id`, `queue_sizes` and `features` (offered
    feature bits, VIRTIO_F_VERSION_1 included), and implement
    `config_space`, `process_queue` and, when they hold state, `reset`.
    """

    device_id: int = 0
    queue_sizes: tuple[int, ...] = ()
    features: int = VIRTIO_F_VERSION_1
    # A back end in another process maps guest RAM (vhost-user): the machine must back it with memfds.
    needs_shared_memory: bool = False

    def __init__(self) -> None:
        self.transport: MmioTransport | None = None
        self.bad_chains = 0  # requests failed because of a malformed chain

    @property
    def name(self) -> str:
        return type(self).__name__

    # -- called by the transport -------------------------------------------

    def config_space(self) -> bytes:
        """The device configuration structure as it reads now."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write into configuration space; ignored unless a device has writable fields."""

    def activate(self) -> None:
        """DRIVER_OK was set: queues are ready, features final. Start host-side I/O here."""

    def process_queue(self, index: int) -> None:
        """The driver notified queue `index` (or host I/O asks for it to be served)."""

    def reset(self) -> None:
        """The driver wrote 0 to Status, or the device is being closed: drop all state."""

    def start_io(self, iothread: IoThread) -> None:
        """Register host file descriptors (TAP, sockets) with the VM's I/O thread."""

    def close(self) -> None:
        """Release host resources (files, sockets)."""

    # -- snapshots (kvmpy/snapshot.py) ----------------------------------------

    def snapshot_config(self) -> dict:
        """What recreates this device for a restored machine: {"kind": ..., arguments}.

        `kvmpy.devices.virtio.attach.device_from_snapshot` is the inverse.
        """
        raise SnapshotRefused(f"{self.name}: no snapshot_config(); kvmpy cannot recreate it on restore")

    def snapshot_state(self) -> dict:
        """Device state beyond the transport's (JSON-able); raise `SnapshotRefused` if none can be taken."""
        return {}

    def restore_state(self, state: dict) -> None:
        """Load `snapshot_state()` into a freshly made device, before its transport is restored."""

    # -- helpers for device code --------------------------------------------

    @property
    def queues(self) -> list[Virtqueue]:
        assert self.transport is not None
        return self.transport.queues

    @property
    def negotiated(self) -> int:
        return self.transport.driver_features if self.transport is not None else 0

    def chains(self, queue: Virtqueue) -> Iterator[DescriptorChain]:
        """Every available chain; a malformed one is returned unused (length 0) and skipped."""
        while True:
            try:
                chain = queue.pop()
            except ChainError as e:
                self.bad_chains += 1
                log.warning("%s: %s", self.name, e)
                queue.add_used(e.head, 0)
                continue
            if chain is None:
                return
            yield chain

    def signal_used(self, queue: Virtqueue) -> None:
        if self.transport is not None:
            self.transport.signal_used(queue)


class MmioTransport:
    """The register file of one virtio-mmio device (the MMIO bus `Device`)."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory,
                 interrupt: Callable[[], None] | None = None) -> None:
        self.device = device
        self.memory = memory
        self.interrupt = interrupt or (lambda: None)
        self.lock = threading.RLock()
        self.queues = [Virtqueue(memory, size, i) for i, size in enumerate(device.queue_sizes)]
        self.device_features = device.features | VIRTIO_F_VERSION_1
        self.config_generation = 0
        self.last_error = ""
        self.interrupts = 0  # interrupts raised (for benchmarks and tests)
        self.notifies = 0    # queue notifications served
        self.notify_owner: NotifyFdOwner | None = None  # attach_virtio's slot: polls the QueueNotify eventfds
        device.transport = self
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.shm_sel = 0
        for q in self.queues:
            q.reset()
            q.indirect = q.event_idx = False

    # -- snapshots (kvmpy/snapshot.py) ----------------------------------------

    def snapshot_state(self) -> dict:
        """Registers, negotiated features, every queue's state, then the device's own (JSON-able).

        Taken with the vCPUs paused; the lock keeps the I/O thread out meanwhile.
        """
        with self.lock:
            return {
                "device_id": self.device.device_id,
                "status": self.status,
                "device_features": self.device_features,
                "driver_features": self.driver_features,
                "device_features_sel": self.device_features_sel,
                "driver_features_sel": self.driver_features_sel,
                "queue_sel": self.queue_sel,
                "config_generation": self.config_generation,
                "interrupt_status": self.interrupt_status,
                "shm_sel": self.shm_sel,
                "queues": [q.snapshot_state() for q in self.queues],
                "device": self.device.snapshot_state(),
            }

    def restore_state(self, s: dict) -> None:
        """Load `snapshot_state()` into the transport of a freshly attached, identical device.

        A device the driver had activated is activated again (host I/O,
        per-queue limits), then every ready queue is served once: buffers
        the driver posted before the snapshot must not wait for a notify
        that already happened. Raises `SnapshotRefused` on a mismatch.
        """
        with self.lock:
            if s["device_id"] != self.device.device_id or len(s["queues"]) != len(self.queues):
                raise SnapshotRefused(f"{self.device.name}: snapshot is of device id {s['device_id']} with "
                                      f"{len(s['queues'])} queues, this is {self.device.device_id} with "
                                      f"{len(self.queues)}")
            if s["device_features"] != self.device_features:
                raise SnapshotRefused(f"{self.device.name}: snapshot offered features {s['device_features']:#x}, "
                                      f"this device offers {self.device_features:#x}")
            self.device.restore_state(s["device"])
            for name in ("status", "driver_features", "device_features_sel", "driver_features_sel", "queue_sel",
                         "config_generation", "interrupt_status", "shm_sel"):
                setattr(self, name, int(s[name]))
            try:
                for q, qs in zip(self.queues, s["queues"]):
                    q.restore_state(qs)
            except QueueError as e:
                raise SnapshotRefused(f"{self.device.name}: {e}") from None
            if self.active:
                self._guarded(self.device.activate)
                for i, q in enumerate(self.queues):
                    if q.ready:
                        self.notify(i)

    @property
    def active(self) -> bool:
        """DRIVER_OK set and no NEEDS_RESET: the device may use its queues."""
        return (self.status & DeviceStatus.DRIVER_OK) != 0 and not self.status & DeviceStatus.DEVICE_NEEDS_RESET

    # -- bus Device protocol -----------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self.lock:
            if offset >= Register.CONFIG:
                return self._read_config(offset - Register.CONFIG, size)
            if size != 4 or offset % 4:
                return 0  # 4.2.2.2: registers are read as 32-bit words only
            return self._read_register(offset) & 0xFFFF_FFFF

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if offset >= Register.CONFIG:
                self.device.write_config(offset - Register.CONFIG, value.to_bytes(size, "little"))
                return
            if size != 4 or offset % 4:
                return
            self._write_register(offset, value & 0xFFFF_FFFF)

    def _read_config(self, offset: int, size: int) -> int:
        data = self.device.config_space()[offset:offset + size]
        return int.from_bytes(data.ljust(size, b"\0"), "little")

    def _selected_queue(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _read_register(self, offset: int) -> int:
        q = self._selected_queue()
        match offset:
            case Register.MAGIC_VALUE:
                return MAGIC_VALUE
            case Register.VERSION:
                return VERSION
            case Register.DEVICE_ID:
                return self.device.device_id
            case Register.VENDOR_ID:
                return VENDOR_ID
            case Register.DEVICE_FEATURES:
                return self.device_features >> (32 * self.device_features_sel) if self.device_features_sel < 2 else 0
            case Register.QUEUE_NUM_MAX:
                return q.max_size if q is not None else 0
            case Register.QUEUE_READY:
                return int(q.ready) if q is not None else 0
            case Register.INTERRUPT_STATUS:
                return self.interrupt_status
            case Register.STATUS:
                return self.status
            case Register.QUEUE_DESC_LOW | Register.QUEUE_DESC_HIGH:
                return _half(q.desc_table if q else 0, offset == Register.QUEUE_DESC_HIGH)
            case Register.QUEUE_DRIVER_LOW | Register.QUEUE_DRIVER_HIGH:
                return _half(q.avail_ring if q else 0, offset == Register.QUEUE_DRIVER_HIGH)
            case Register.QUEUE_DEVICE_LOW | Register.QUEUE_DEVICE_HIGH:
                return _half(q.used_ring if q else 0, offset == Register.QUEUE_DEVICE_HIGH)
            case Register.SHM_LEN_LOW | Register.SHM_LEN_HIGH | Register.SHM_BASE_LOW | Register.SHM_BASE_HIGH:
                return 0xFFFF_FFFF  # 4.2.2: all ones = no shared memory region with this ID
            case Register.CONFIG_GENERATION:
                return self.config_generation
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        q = self._selected_queue()
        # Queue registers may change only while the queue is not ready (4.2.3.2).
        q_writable = q is not None and not q.ready
        match offset:
            case Register.DEVICE_FEATURES_SEL:
                self.device_features_sel = value
            case Register.DRIVER_FEATURES_SEL:
                self.driver_features_sel = value
            case Register.DRIVER_FEATURES:
                if self.status & DeviceStatus.FEATURES_OK or self.driver_features_sel > 1:
                    return  # features are final once FEATURES_OK is set
                shift = 32 * self.driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
            case Register.QUEUE_SEL:
                self.queue_sel = value
            case Register.QUEUE_NUM if q_writable:
                q.size = value
            case Register.QUEUE_READY if q is not None:
                if value & 1 and not q.ready:
                    try:
                        q.check()
                    except QueueError as e:
                        self.set_needs_reset(str(e))
                        return
                    q.ready = True
                elif not value & 1:
                    q.ready = False
            case Register.QUEUE_NOTIFY:
                self.notify(value & 0xFFFF)
            case Register.INTERRUPT_ACK:
                self.interrupt_status &= ~value
            case Register.STATUS:
                self._write_status(value)
            case Register.QUEUE_DESC_LOW | Register.QUEUE_DESC_HIGH if q_writable:
                q.desc_table = _set_half(q.desc_table, offset == Register.QUEUE_DESC_HIGH, value)
            case Register.QUEUE_DRIVER_LOW | Register.QUEUE_DRIVER_HIGH if q_writable:
                q.avail_ring = _set_half(q.avail_ring, offset == Register.QUEUE_DRIVER_HIGH, value)
            case Register.QUEUE_DEVICE_LOW | Register.QUEUE_DEVICE_HIGH if q_writable:
                q.used_ring = _set_half(q.used_ring, offset == Register.QUEUE_DEVICE_HIGH, value)
            case Register.SHM_SEL:
                self.shm_sel = value

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = self.status
        new = (value & 0xFF) | (old & DeviceStatus.DEVICE_NEEDS_RESET)
        if new & DeviceStatus.FEATURES_OK and not old & DeviceStatus.FEATURES_OK:
            unsupported = self.driver_features & ~self.device_features
            if unsupported or not self.driver_features & VIRTIO_F_VERSION_1:
                # 3.1.1: the driver re-reads Status and sees FEATURES_OK refused.
                self.last_error = (f"{self.device.name}: features refused (unsupported {unsupported:#x}, "
                                   f"VERSION_1 {'set' if self.driver_features & VIRTIO_F_VERSION_1 else 'missing'})")
                new &= ~DeviceStatus.FEATURES_OK
            else:
                for q in self.queues:
                    q.indirect = bool(self.driver_features & VIRTIO_F_INDIRECT_DESC)
                    q.event_idx = bool(self.driver_features & VIRTIO_F_EVENT_IDX)
        if new & DeviceStatus.DRIVER_OK and not old & DeviceStatus.DRIVER_OK:
            if not new & DeviceStatus.FEATURES_OK:
                self.status = new & ~DeviceStatus.DRIVER_OK
                self.set_needs_reset("DRIVER_OK set without FEATURES_OK")
                return
            self.status = new
            self._guarded(self.device.activate)
            return
        self.status = new

    def reset(self) -> None:
        """Device reset (2.4): back to the power-on state; the driver reads Status 0 afterwards."""
        with self.lock:
            try:
                self.device.reset()
            except Exception as e:  # a device bug must not keep the driver from resetting
                log.exception("%s: reset failed", self.device.name)
                self.last_error = f"{self.device.name}: reset: {e}"
            self._reset_registers()

    # -- queue work and interrupts --------------------------------------------

    def notify(self, index: int) -> None:
        """Queue `index` has new buffers: let the device serve it. Never raises."""
        with self.lock:
            self.notifies += 1
            if not self.active or index >= len(self.queues) or not self.queues[index].ready:
                return
            self._guarded(self.device.process_queue, index)

    def run(self, fn: Callable[..., None], *args: object) -> None:
        """Run host-initiated device work (TAP or socket readable) under the lock, guarded like `notify`."""
        with self.lock:
            if self.active:
                self._guarded(fn, *args)

    def _guarded(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except (QueueError, GuestMemoryError) as e:
            self.set_needs_reset(str(e))
        except Exception as e:  # a device bug: stop the device, never the vCPU or I/O thread
            log.exception("%s: unexpected error", self.device.name)
            self.set_needs_reset(f"{type(e).__name__}: {e}")

    def signal_used(self, queue: Virtqueue) -> None:
        """Raise a used-buffer interrupt if the driver wants one for what was just added."""
        with self.lock:
            try:
                wanted = queue.needs_interrupt()
            except QueueError as e:
                self.set_needs_reset(str(e))
                return
            if wanted:
                self._raise(InterruptStatus.USED_BUFFER)

    def raise_used_buffer(self) -> None:
        """A used-buffer interrupt a back end outside kvmpy decided on (vhost checked EVENT_IDX itself).

        Linux's vm_interrupt processes the vrings only when InterruptStatus
        has the used-buffer bit, so the bit is set here before the interrupt.
        """
        with self.lock:
            if self.active:
                self._raise(InterruptStatus.USED_BUFFER)

    def claim_notify_fd(self, index: int) -> int | None:
        """Queue `index`'s QueueNotify eventfd for the caller to hand to the kernel; the I/O thread stops polling it.

        Returns a duplicate the caller closes, or None when the guest's
        notifies are MMIO exits (they reach `process_queue` as before).
        """
        return self.notify_owner.claim(index) if self.notify_owner is not None else None

    def release_notify_fd(self, index: int) -> None:
        """Undo `claim_notify_fd`: the I/O thread polls queue `index`'s eventfd again."""
        if self.notify_owner is not None:
            self.notify_owner.release(index)

    def signal_config(self) -> None:
        """The device changed its configuration space (2.5.1)."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF
            if self.status & DeviceStatus.DRIVER_OK:
                self._raise(InterruptStatus.CONFIG_CHANGE)

    def set_needs_reset(self, reason: str) -> None:
        """Enter DEVICE_NEEDS_RESET (2.1.2): stop using the queues, tell the driver."""
        with self.lock:
            log.warning("%s: needs reset: %s", self.device.name, reason)
            self.last_error = reason
            if self.status & DeviceStatus.DEVICE_NEEDS_RESET:
                return
            self.status |= DeviceStatus.DEVICE_NEEDS_RESET
            if self.status & DeviceStatus.DRIVER_OK:
                self._raise(InterruptStatus.CONFIG_CHANGE)

    def _raise(self, bits: int) -> None:
        self.interrupt_status |= bits
        self.interrupts += 1
        self.interrupt()

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & DeviceStatus.DEVICE_NEEDS_RESET)

    def __repr__(self) -> str:
        return f"MmioTransport({self.device.name}, status={DeviceStatus(self.status)!r})"


def _half(value: int, high: bool) -> int:
    return (value >> 32) if high else value & 0xFFFF_FFFF


def _set_half(old: int, high: bool, value: int) -> int:
    if high:
        return (old & 0xFFFF_FFFF) | (value << 32)
    return (old & ~0xFFFF_FFFF) | value


__all__ = [
    "DeviceId", "DeviceStatus", "InterruptStatus", "MMIO_WINDOW", "MmioTransport", "NotifyFdOwner", "Register",
    "SnapshotRefused",
    "VIRTIO_F_EVENT_IDX", "VIRTIO_F_INDIRECT_DESC", "VIRTIO_F_VERSION_1", "VirtioDevice",
]
