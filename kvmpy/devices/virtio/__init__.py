"""virtio-mmio devices (virtio 1.2): the transport, split virtqueues, and the device types.

    mmio.py      the virtio-mmio v2 register file (`MmioTransport`) and `VirtioDevice`
    queue.py     split virtqueues: descriptor chains checked against guest RAM
    blk.py       virtio-blk on a raw image      net.py   virtio-net on a TAP fd
    rng.py       virtio-rng from os.urandom     vsock.py virtio-vsock to AF_UNIX sockets
    iothread.py  the per-VM epoll thread        attach.py MMIO windows, ioeventfd, irqfd, cmdline
"""

from .mmio import DeviceId, DeviceStatus, MmioTransport, VirtioDevice
from .queue import ChainError, DescriptorChain, QueueError, Virtqueue

__all__ = ["ChainError", "DescriptorChain", "DeviceId", "DeviceStatus", "MmioTransport", "QueueError",
           "VirtioDevice", "Virtqueue"]
