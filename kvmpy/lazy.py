"""Lazy restore: guest RAM whose pages are read from the snapshot only when first touched (userfaultfd).

    machine, report = restore_lazy("snap/")          # like restore_machine, but no page is read yet
    machine.start()                                  # each first touch of a page faults it in

For snapshots that MAP_PRIVATE of memory.bin cannot serve: a memory file
still being fetched from another host (a page past its current end is served
once the bytes arrive), or on a file system that cannot be mapped. As
Firecracker and Cloud Hypervisor do it:

- guest RAM is private anonymous memory registered with a userfaultfd
  (userfaultfd(2), UFFDIO_API, UFFDIO_REGISTER in missing mode:
  Documentation/admin-guide/mm/userfaultfd.rst);
- the userfaultfd goes (SCM_RIGHTS) to a page server, a separate process
  (`python -m kvmpy.lazy`), as Firecracker's UFFD handler: in this process
  a VMM thread holding Python's GIL may be the one waiting on a fault, so
  the handler cannot be a thread here. One of its threads per lazy memory
  waits on the userfaultfd; each fault message names a page no one has
  touched, whether the toucher is a vCPU (KVM's get_user_pages blocks inside
  KVM_RUN until the page is there) or the VMM; it reads that page's `chunk`
  bytes from the file and installs them with UFFDIO_COPY (all-zero pages
  with UFFDIO_ZEROPAGE), which wakes the toucher.

No PyPI library wraps userfaultfd (checked: the name `uffd` is an
unrelated web application), so this is ctypes: the syscall (323 on x86-64)
and three ioctls whose numbers come from <linux/userfaultfd.h>.

The kernel must allow it: as root (CAP_SYS_PTRACE), or with
vm.unprivileged_userfaultfd=1; faults taken in the kernel (KVM's) need a
userfaultfd without UFFD_USER_MODE_ONLY, which only those get.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import mmap
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from .cow import mark_filled_on_fault
from .errors import GuestMemoryError, KvmError, SnapshotError
from .memory import PAGE_SIZE, GuestMemory

# <linux/userfaultfd.h> (x86-64); userfaultfd(2) is syscall 323 there.
_NR_USERFAULTFD = 323
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)
UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register)
UFFDIO_COPY = 0xC028AA03  # _IOWR(0xAA, 0x03, struct uffdio_copy)
UFFDIO_ZEROPAGE = 0xC020AA04  # _IOWR(0xAA, 0x04, struct uffdio_zeropage)
UFFDIO_REGISTER_MODE_MISSING = 1
UFFD_EVENT_PAGEFAULT = 0x12
_MSG = struct.Struct("<B7xQQ8x")  # struct uffd_msg: event, pad; pagefault.flags, .address, .feat (32 bytes)
_EEXIST = 17
_MAP_NORESERVE = 0x4000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


class UserfaultfdError(KvmError):
    """userfaultfd cannot be used here (the message says why)."""


def _ioctl(fd: int, request: int, buf: ctypes.Array, name: str) -> None:
    if _libc.ioctl(fd, request, ctypes.addressof(buf)) != 0:
        err = ctypes.get_errno()
        raise UserfaultfdError(f"{name}: {os.strerror(err)}")


def userfaultfd() -> int:
    """A userfaultfd after the UFFDIO_API handshake (non-blocking, close-on-exec)."""
    fd = _libc.syscall(_NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        err = ctypes.get_errno()
        hint = ("; run as root or set vm.unprivileged_userfaultfd=1" if err in (1, 13) else "")
        raise UserfaultfdError(f"userfaultfd(2): {os.strerror(err)}{hint}")
    api = ctypes.create_string_buffer(struct.pack("<QQQ", UFFD_API, 0, 0), 24)
    try:
        _ioctl(fd, UFFDIO_API, api, "UFFDIO_API")
    except BaseException:
        os.close(fd)
        raise
    return fd


def unavailable() -> str | None:
    """Why userfaultfd cannot serve guest RAM here, or None."""
    try:
        fd = userfaultfd()
    except UserfaultfdError as e:
        return str(e)
    os.close(fd)
    return None


class PageServer:
    """The process that serves page faults (`python -m kvmpy.lazy SOCKET`), as Firecracker's UFFD handler.

    A separate process because the handler must run while a VMM thread that
    holds Python's GIL waits on a fault; one server serves every lazy memory
    of this process, each on a thread of its own.
    """

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="kvmpy-uffd-")
        self.path = os.path.join(self._dir, "server.sock")
        self.proc = subprocess.Popen([sys.executable, "-m", "kvmpy.lazy", self.path], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise UserfaultfdError(f"the page-fault server did not start (status {self.proc.poll()})")
            time.sleep(0.005)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        shutil.rmtree(self._dir, ignore_errors=True)


_server: PageServer | None = None
_server_lock = threading.Lock()


def page_server() -> PageServer:
    """This process's page-fault server, started on first use (ended with the process)."""
    global _server
    with _server_lock:
        if _server is None or _server.proc.poll() is not None:
            _server = PageServer()
            atexit.register(_server.close)
        return _server


class LazyGuestMemory(GuestMemory):
    """Guest RAM laid out as `layout` [(gpa, size, file offset)], each page read from `path` when first touched.

    `path` may still be growing (a memory file being fetched): a page past
    its end is served once the bytes are there (`wait` seconds at most, then
    zeros, and `error` says so).
    """

    def __init__(self, layout: list[tuple[int, int, int]], path: str | os.PathLike[str], *,
                 chunk: int = PAGE_SIZE, wait: float = 60.0) -> None:
        super().__init__(0)
        if chunk % PAGE_SIZE or chunk <= 0:
            raise GuestMemoryError(f"lazy chunk of {chunk} bytes is not a multiple of {PAGE_SIZE}")
        self.conn: socket.socket | None = None
        self._errors = b""
        uffd = userfaultfd()
        try:
            ranges = []
            for gpa, size, offset in layout:
                mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
                r = self.add_region(gpa, size, mapping=mapping)
                mark_filled_on_fault(r)  # a fork's template must copy it all, not only present pages
                reg = ctypes.create_string_buffer(struct.pack("<QQQQ", r.host_address, size,
                                                              UFFDIO_REGISTER_MODE_MISSING, 0), 32)
                _ioctl(uffd, UFFDIO_REGISTER, reg, "UFFDIO_REGISTER")
                ranges.append([r.host_address, size, offset])
            self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self.conn.connect(page_server().path)
            request = json.dumps({"path": os.fspath(path), "ranges": ranges, "chunk": chunk, "wait": wait})
            socket.send_fds(self.conn, [request.encode() + b"\n"], [uffd])
            self.conn.settimeout(30)
            answer = self.conn.recv(256)
            if answer != b"OK\n":
                raise UserfaultfdError(f"the page-fault server refused {path}: {answer.decode(errors='replace')}")
            self.conn.setblocking(False)
        except BaseException:
            if self.conn is not None:
                self.conn.close()
            super().close()
            raise
        finally:
            os.close(uffd)  # the server holds it now; the ranges stay registered while it does

    @property
    def pages_served(self) -> int:
        """Pages present in guest RAM: each one a fault the server served (/proc/self/pagemap)."""
        from .cow import pagemap

        return sum(int(((pagemap(r) >> 63) & 1).sum()) for r in self)

    @property
    def error(self) -> str | None:
        """What the server could not serve (it served zeros there, so no toucher hangs), or None."""
        if self.conn is not None:
            try:
                self._errors += self.conn.recv(65536)
            except (BlockingIOError, OSError):
                pass
        return self._errors.decode(errors="replace").strip() or None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()  # the server's thread ends and closes the userfaultfd
            self.conn = None
        super().close()


def _serve_client(conn: socket.socket) -> None:
    """Server side: one lazy memory's faults, until its VMM closes the connection."""
    msg, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 1)
    try:
        (uffd,) = fds
        req = json.loads(msg.split(b"\n", 1)[0])
        fd = os.open(req["path"], os.O_RDONLY | os.O_CLOEXEC)
    except (ValueError, KeyError, OSError) as e:
        conn.sendall(f"{e}\n".encode())
        conn.close()
        return
    ranges = [tuple(r) for r in req["ranges"]]
    chunk, wait = int(req["chunk"]), float(req["wait"])
    os.set_blocking(uffd, False)
    conn.sendall(b"OK\n")
    buf = ctypes.create_string_buffer(chunk)
    poller = select.poll()
    poller.register(uffd, select.POLLIN)
    poller.register(conn.fileno(), select.POLLIN)
    try:
        while True:
            for ready, _ev in poller.poll():
                if ready != uffd:
                    return  # the VMM closed its memory
                try:
                    raw = os.read(uffd, _MSG.size * 16)
                except BlockingIOError:
                    continue
                for i in range(0, len(raw) - _MSG.size + 1, _MSG.size):
                    event, _fl, address = _MSG.unpack_from(raw, i)
                    if event == UFFD_EVENT_PAGEFAULT:
                        _serve_fault(uffd, fd, ranges, chunk, wait, buf, address, conn)
    finally:
        os.close(fd)
        os.close(uffd)
        conn.close()


def _serve_fault(uffd: int, fd: int, ranges: list, chunk: int, wait: float, buf: Any, address: int,
                 conn: socket.socket) -> None:
    for start, size, offset in ranges:  # noqa: B007  # the matching range's values are used below
        if start <= address < start + size:
            break
    else:
        return
    page = (address - start) // chunk * chunk
    length = min(chunk, size - page)
    deadline = time.monotonic() + wait
    data = os.pread(fd, length, offset + page)
    while len(data) < length and time.monotonic() < deadline:  # a file still being fetched
        time.sleep(0.002)
        data = os.pread(fd, length, offset + page)
    if len(data) < length:
        conn.sendall(f"offset {offset + page}: the memory file ends before it; served zeros\n".encode())
        data = bytes(length)
    if data.count(0) == length:
        req, request = struct.pack("<QQQq", start + page, length, 0, 0), UFFDIO_ZEROPAGE
    else:
        ctypes.memmove(buf, data, length)
        req, request = struct.pack("<QQQQq", start + page, ctypes.addressof(buf), length, 0, 0), UFFDIO_COPY
    arg = ctypes.create_string_buffer(req, len(req))
    if _libc.ioctl(uffd, request, ctypes.addressof(arg)) != 0 and ctypes.get_errno() != _EEXIST:
        conn.sendall(f"ioctl at {start + page:#x}: {os.strerror(ctypes.get_errno())}\n".encode())


def serve(path: str) -> None:
    """The page server's main loop: accept lazy memories on the Unix socket `path`, one thread each."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)  # the path appears once it accepts
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve_client, args=(conn,), daemon=True).start()


def restore_lazy(snapshot: Any, *, path: str | os.PathLike[str] | None = None, chunk: int = PAGE_SIZE,
                 console: Callable[[bytes], None] | None = None, kvm: Any = None) -> tuple[Any, Any]:
    """`restore_machine`, with guest RAM served on demand from `path` (default: the snapshot's memory.bin)."""
    from .snapshot import MEMORY_FILE, Snapshot, restore_machine

    snap = snapshot if isinstance(snapshot, Snapshot) else Snapshot.open(snapshot)
    if snap.manifest.get("parent") is not None:
        raise SnapshotError(f"{snap.directory}: an incremental snapshot; merge() its chain for a lazy restore")
    layout = [(r["gpa"], r["size"], r["offset"]) for r in snap.manifest["memory"]]
    memory = LazyGuestMemory(layout, path or snap.directory / MEMORY_FILE, chunk=chunk)
    return restore_machine(snap, console=console, kvm=kvm, memory=memory)


def benchmark(mib: int, repeat: int) -> dict:
    """First guest instruction after a lazy restore of a `mib` MiB guest vs a MAP_PRIVATE restore (same run)."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from .machine import MachineConfig, build
    from .snapshot import Snapshot, restore_machine, take_snapshot

    counter = 0x200000
    work = Path(tempfile.mkdtemp(prefix="kvmpy-lazy-"))
    try:
        src = work / "c.s"
        src.write_text(".code32\n.text\n.globl _start\n.align 4\n.long 0x1BADB002, 0, -0x1BADB002\n"
                       f"_start:\n1: incl {counter:#x}\njmp 1b\n")
        subprocess.run(["as", "--32", "-o", str(work / "c.o"), str(src)], check=True)
        subprocess.run(["ld", "-m", "elf_i386", "-N", "-Ttext", "0x100000", "-e", "_start", "-o",
                        str(work / "c.elf"), str(work / "c.o")], check=True, capture_output=True)
        with build(MachineConfig(kernel=work / "c.elf", memory=f"{mib}M")) as m:
            m.start()
            while m.memory.read_u32(counter) == 0:
                time.sleep(0.01)
            m.pause()
            take_snapshot(m, work / "s")
        snap = Snapshot.open(work / "s")
        out: dict = {"mib": mib, "lazy": [], "private": [], "served": 0}
        for _ in range(repeat):
            for kind in ("lazy", "private"):
                t = time.perf_counter()
                machine, _ = restore_lazy(snap) if kind == "lazy" else restore_machine(snap)
                before = machine.memory.read_u32(counter)
                machine.start()
                while machine.memory.read_u32(counter) == before:
                    pass
                out[kind].append(time.perf_counter() - t)
                if kind == "lazy":
                    out["served"] = machine.memory.pages_served  # type: ignore[union-attr]
                machine.close()
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


__all__ = ["LazyGuestMemory", "PageServer", "UserfaultfdError", "benchmark", "page_server", "restore_lazy", "serve",
           "unavailable", "userfaultfd"]


if __name__ == "__main__":
    serve(sys.argv[1])
