"""One I/O thread per VM: epoll over queue-notify eventfds, TAP fds and sockets.

With KVM_IOEVENTFD on each device's QueueNotify register, a guest notify
is a write that KVM turns into an eventfd signal without leaving the
kernel: the vCPU thread runs no Python for it. This thread wakes on the
eventfd and lets the device serve its queue; the device's interrupt goes
back through KVM_IRQFD. Host-side sources (a TAP becoming readable, a vsock
peer's socket) are polled here too, so every device runs on one thread and
never races itself.

Callbacks run on this thread and must not block. One that raises is
logged and the loop goes on: a device error must not stop the other
devices' I/O.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import Callable

log = logging.getLogger("kvmpy.virtio")

Callback = Callable[[int], None]  # called with the epoll event mask


class IoThread:
    """An epoll loop on its own thread. `add`/`modify`/`remove` may be called from any thread."""

    def __init__(self, name: str = "virtio-io") -> None:
        self.name = name
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callback] = {}
        self._lock = threading.Lock()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.errors = 0
        self.wakeups = 0

    # -- sources ---------------------------------------------------------------

    def add(self, fd: int, callback: Callback, events: int = select.EPOLLIN) -> None:
        with self._lock:
            self._callbacks[fd] = callback
        self._epoll.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        """Change what `fd` is polled for (0: keep it registered but quiet)."""
        if fd in self._callbacks:
            self._epoll.modify(fd, events)

    def remove(self, fd: int) -> None:
        with self._lock:
            if self._callbacks.pop(fd, None) is None:
                return
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # the fd was closed already: epoll dropped it itself

    def add_eventfd(self, fd: int, callback: Callable[[], None]) -> None:
        """Poll an eventfd: drain its counter, then call `callback()`."""
        def on_event(_events: int) -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            callback()
        self.add(fd, on_event)

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the I/O thread (through a one-shot eventfd)."""
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

        def once() -> None:
            self.remove(efd)
            os.close(efd)
            callback()
        self.add_eventfd(efd, once)
        os.eventfd_write(efd, 1)

    # -- the loop ----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stopping:
            try:
                ready = self._epoll.poll()
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return  # epoll closed under us
            self.wakeups += 1
            for fd, events in ready:
                if fd == self._wake:
                    continue
                callback = self._callbacks.get(fd)
                if callback is None:
                    continue
                try:
                    callback(events)
                except Exception:
                    self.errors += 1
                    log.exception("%s: callback for fd %d failed", self.name, fd)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._thread = None

    def close(self) -> None:
        self.stop()
        self._epoll.close()
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1
        self._callbacks.clear()

    def __enter__(self) -> IoThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["IoThread"]
