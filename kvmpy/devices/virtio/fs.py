"""virtio-fs (virtio 1.2 section 5.11): a host directory served by virtiofsd through vhost-user.

The guest's virtio_fs driver speaks FUSE over virtqueues: queue 0 is the
high-priority queue (FORGET, INTERRUPT), queues 1..N the request queues.
kvmpy never reads a FUSE request: virtiofsd, a separate process, serves
every queue straight from guest memory, which is why the machine backs
guest RAM with memfds (`needs_shared_memory`) whose fds go to the daemon
in VHOST_USER_SET_MEM_TABLE. kvmpy keeps what the transport owns: feature
negotiation, the configuration space (`tag`, `num_request_queues`) and
the interrupts.

Life cycle (docs/virtio-fs.md has the message sequence):

- construction: start virtiofsd (`kvmpy.virtiofsd.Virtiofsd`), connect,
  GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_OWNER; so a missing daemon
  or directory is an error before anything boots.
- DRIVER_OK (`activate`): SET_FEATURES, SET_MEM_TABLE, then per queue
  SET_VRING_NUM/BASE/ADDR/KICK/CALL/ERR and SET_VRING_ENABLE 1. Kicks are
  the queues' KVM ioeventfds and calls come back through the I/O thread
  as used-buffer interrupts (`BackendVrings`, shared with vhost-vsock).
- reset or close: GET_VRING_BASE per vring (the daemon stops it), the
  ioeventfds go back to the I/O thread; close also ends the daemon.

If the daemon dies or closes the socket, the I/O thread sees the socket
hang up and the device enters DEVICE_NEEDS_RESET with an error naming the
daemon's exit (`failure`); no reconnect is attempted (the open files and
FUSE node IDs the guest holds died with the daemon). Guest processes
waiting on the share then wait for ever; the VMM and its other devices
carry on.
"""

from __future__ import annotations

import logging
import select
import struct
from typing import TYPE_CHECKING

from ...errors import KvmError
from ...memory import GuestMemory
from ...virtiofsd import ShareConfig, Virtiofsd, validate_share
from .mmio import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceId,
    SnapshotRefused,
    VirtioDevice,
)
from .queue import QueueError
from .vhost import BackendVrings
from .vhost_user import (
    FRONTEND_PROTOCOL_FEATURES,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ProtocolFeature,
    VhostUserError,
    VhostUserFrontend,
    VhostUserMemoryRegion,
)

if TYPE_CHECKING:
    from .iothread import IoThread

log = logging.getLogger("kvmpy.virtio")

HIPRIO = 0
QUEUE_SIZE = 128  # QEMU's vhost-user-fs default; libvhost-user takes up to 1024
NUM_REQUEST_QUEUES = 1  # Linux 6.1's virtio_fs uses one request queue whatever the device offers
CONFIG = struct.Struct("<36sI")  # struct virtio_fs_config: tag[36], le32 num_request_queues (5.11.4)
# What kvmpy's transport can offer of the daemon's features. VIRTIO_F_ACCESS_PLATFORM would
# need an IOTLB; VHOST_F_LOG_ALL is for migration; the daemon's other bits are not virtio-fs's.
OFFERED = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX


class MemoryNotShared(KvmError):
    """Guest RAM is private anonymous memory, which a vhost-user back end cannot map."""


def vhost_user_memory_table(memory: GuestMemory) -> list[VhostUserMemoryRegion]:
    """Every RAM region with its memfd, for SET_MEM_TABLE; `MemoryNotShared` if one has none."""
    table = []
    for r in memory:
        if r.fd < 0:
            raise MemoryNotShared(f"guest RAM region at {r.gpa:#x} is not memfd-backed; a vhost-user device needs "
                                  "GuestMemory(..., memfd=True) (the machine does it for devices with "
                                  "needs_shared_memory)")
        table.append(VhostUserMemoryRegion(r.gpa, r.size, r.host_address, r.fd_offset, r.fd))
    return table


class VirtioFsDevice(VirtioDevice):
    """A virtio-fs device exporting `share.host_dir` under `share.tag`, served by its own virtiofsd."""

    device_id = DeviceId.FS
    needs_shared_memory = True

    def __init__(self, share: ShareConfig, *, daemon: Virtiofsd | None = None, timeout: float = 10.0) -> None:
        super().__init__()
        self.share = validate_share(share)
        self.queue_sizes = (QUEUE_SIZE,) * (1 + NUM_REQUEST_QUEUES)
        self.daemon = daemon or Virtiofsd(self.share)
        self.failure = ""  # why the device stopped for good (the daemon died), or ''
        self.running = False
        self.iothread: IoThread | None = None
        self.vrings = BackendVrings(len(self.queue_sizes))
        try:
            self.frontend = VhostUserFrontend(self.daemon.socket_path, timeout=timeout)
            self.daemon.unlink_paths()
            self._negotiate()
        except BaseException:
            self.vrings.close()
            self.daemon.stop()
            raise

    def _negotiate(self) -> None:
        fe = self.frontend
        self.backend_features = fe.get_features()
        self.protocol_features = 0
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES:
            self.protocol_features = fe.get_protocol_features() & FRONTEND_PROTOCOL_FEATURES
            fe.set_protocol_features(self.protocol_features)
            if self.protocol_features & ProtocolFeature.MQ:
                queues = fe.get_queue_num()
                if queues < len(self.queue_sizes):
                    raise VhostUserError(f"{self.daemon.binary.path} serves {queues} queue(s); virtio-fs "
                                         f"needs {len(self.queue_sizes)} (hiprio + requests)")
        fe.set_owner()
        if not self.backend_features & VIRTIO_F_VERSION_1:
            raise VhostUserError(f"{self.daemon.binary.path}: its device lacks VIRTIO_F_VERSION_1 "
                                 f"(features {self.backend_features:#x})")
        self.features = OFFERED & self.backend_features

    @property
    def name(self) -> str:
        return f"VirtioFs[{self.share.tag}]"

    def config_space(self) -> bytes:
        return CONFIG.pack(self.share.tag.encode(), NUM_REQUEST_QUEUES)

    # -- the I/O thread: the daemon's eventfds and its socket ----------------------

    def start_io(self, iothread: IoThread) -> None:
        self.iothread = iothread
        self.vrings.start_io(iothread, lambda: self.transport, self._vring_error)
        # The daemon never writes on this socket unasked (no BACKEND_REQ), so a hang-up is its death.
        iothread.add(self.frontend.fileno(), lambda _ev: self._socket_closed(), select.EPOLLRDHUP)

    def _socket_closed(self) -> None:
        if self.iothread is not None:
            self.iothread.remove(self.frontend.fileno())
        try:
            self.daemon.process.wait(0.5)  # it closed the socket: let it finish dying, for the exit status
        except Exception:
            pass
        self.failure = (f"virtio-fs {self.share.tag!r} ({self.share.host_dir}): {self.daemon.describe_exit()}; "
                        "the share is gone until the VM is restarted")
        log.error("%s", self.failure)
        self.running = False
        if self.transport is not None:
            self.transport.set_needs_reset(self.failure)

    def _vring_error(self, index: int) -> None:
        assert self.transport is not None
        self.transport.set_needs_reset(f"{self.name}: virtiofsd reported an error on vring {index} "
                                       "(a descriptor or ring the guest broke)")

    # -- handing the queues to the daemon -------------------------------------------

    def activate(self) -> None:
        try:
            self._start()
        except (KvmError, QueueError) as e:
            log.error("%s: %s", self.name, e)
            self._stop()
            assert self.transport is not None
            self.transport.set_needs_reset(f"{self.name}: {e}")

    def _host_address(self, gpa: int) -> int:
        assert self.transport is not None  # Virtqueue.check() put every ring inside one region
        return self.transport.memory.host_address(gpa)

    def _start(self) -> None:
        assert self.transport is not None
        if self.failure:
            raise VhostUserError(self.failure)
        fe = self.frontend
        features = self.negotiated & self.backend_features
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES:
            features |= VHOST_USER_F_PROTOCOL_FEATURES  # keeps the protocol extension on (rings start disabled)
        fe.set_features(features)
        fe.set_mem_table(vhost_user_memory_table(self.transport.memory))
        self.running = True  # from here on, a stop must ask for the vring bases
        for i, q in enumerate(self.queues):
            if not q.ready:
                continue  # a queue the driver did not set up stays with nobody
            fe.set_vring_num(i, q.size)
            fe.set_vring_base(i, q.last_avail_idx)
            fe.set_vring_addr(i, self._host_address(q.desc_table), self._host_address(q.used_ring),
                              self._host_address(q.avail_ring))
            fe.set_vring_kick(i, self.vrings.take_kick(self.transport, i))
            fe.set_vring_call(i, self.vrings.call_fds[i])
            fe.set_vring_err(i, self.vrings.err_fds[i])
            if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES:
                fe.set_vring_enable(i, True)

    def _stop(self) -> None:
        """GET_VRING_BASE per started vring (the daemon stops it); the ioeventfds go back to the I/O thread."""
        if self.running and not self.failure:
            for i in sorted(self.vrings.kick_fds):
                try:
                    base = self.frontend.get_vring_base(i)
                except VhostUserError as e:
                    log.warning("%s: %s", self.name, e)
                    break
                if self.transport is not None:
                    self.queues[i].last_avail_idx = base
        self.running = False
        self.vrings.release_kicks()

    def process_queue(self, index: int) -> None:
        if self.running:
            self.vrings.kick(index)  # a notify that reached kvmpy (no ioeventfd): pass it on

    # -- snapshots -------------------------------------------------------------------

    def snapshot_config(self) -> dict:
        raise SnapshotRefused(f"{self.name}: virtiofsd holds the guest's open files and FUSE node IDs, which "
                              "kvmpy cannot save; unmount the share and snapshot a VM without --share")

    # -- lifetime ----------------------------------------------------------------------

    def reset(self) -> None:
        self._stop()

    def close(self) -> None:
        self._stop()
        if self.iothread is not None and self.frontend.sock.fileno() >= 0:
            self.iothread.remove(self.frontend.fileno())
        self.frontend.close()  # the daemon ends its session and exits
        self.daemon.stop()
        self.vrings.close()
        self.iothread = None


def share_devices(shares: list[ShareConfig | str]) -> list[VirtioFsDevice]:
    """A `VirtioFsDevice` per share (`ShareConfig` or a `--share` string); on an error the ones made are closed."""
    from ...virtiofsd import validate_shares

    configs = validate_shares(shares)
    made: list[VirtioFsDevice] = []
    try:
        for c in configs:
            made.append(VirtioFsDevice(c))
    except BaseException:
        for d in made:
            d.close()
        raise
    return made


__all__ = ["CONFIG", "HIPRIO", "MemoryNotShared", "NUM_REQUEST_QUEUES", "QUEUE_SIZE", "VirtioFsDevice",
           "share_devices", "vhost_user_memory_table"]
