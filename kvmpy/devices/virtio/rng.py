"""virtio-rng (virtio 1.2 section 5.4): entropy from the host's os.urandom.

One request queue of device-writable buffers; the device fills each with
random bytes and returns it. A request is capped at `MAX_REQUEST` bytes so
a guest cannot make the VMM allocate without bound; the driver asks again.
"""

from __future__ import annotations

import os

from .mmio import (VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, DeviceId, SnapshotRefused,
                   VirtioDevice)

QUEUE_SIZE = 64
MAX_REQUEST = 64 << 10


class EntropyDevice(VirtioDevice):
    """virtio-rng: no configuration space, no features beyond the ring ones."""

    device_id = DeviceId.ENTROPY
    queue_sizes = (QUEUE_SIZE,)
    features = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX

    def __init__(self, source=os.urandom) -> None:
        super().__init__()
        self.source = source
        self.bytes_served = 0

    def process_queue(self, index: int) -> None:
        q = self.queues[0]
        for chain in self.chains(q):
            n = min(chain.writable_len, MAX_REQUEST)
            written = chain.write(self.source(n)) if n else 0
            self.bytes_served += written
            q.add_used(chain.head, written)
        self.signal_used(q)  # a no-op unless entries were added (malformed chains included)

    def snapshot_config(self) -> dict:
        if self.source is not os.urandom:
            raise SnapshotRefused(f"{self.name}: a custom entropy source cannot be recorded in a snapshot")
        return {"kind": "rng"}


__all__ = ["EntropyDevice", "MAX_REQUEST"]
