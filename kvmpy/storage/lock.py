"""Image locks as QEMU takes them: open file description (OFD) byte-range locks.

QEMU's file-posix driver (block/file-posix.c, "image locking") expresses
each block-layer permission as a one-byte shared lock: byte 100 + bit
means "I hold permission bit", byte 200 + bit means "I do not let others
hold it". Bits: 0 consistent read, 1 write, 2 write-unchanged, 3 resize.
Observed on QEMU 7.2 (/proc/locks): a writer (`qemu-io IMG`) locks 100,
101, 103, 201, 203; a reader (`qemu-io -r`, or a backing file) locks 100,
201, 203. kvmpy takes the same bytes, so it and QEMU refuse each other:
one writer and no reader beside it, or any number of readers.

OFD locks (F_OFD_SETLK) belong to the open file description, not the
process: two opens in one process conflict like two processes do, a
forked child that keeps the fd keeps the lock, and the kernel drops them
when the last fd closes, also when the process is SIGKILLed.

Conflicts are tested after taking our own bytes (QEMU's order too), so two
racing openers can both fail but never both succeed. F_OFD_GETLK reports
pid -1 for an OFD lock; the holder's pid is found in /proc/*/fdinfo, whose
"lock:" lines list the locks each open file holds.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .image import ImageLockedError, StorageError

LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
_FLOCK = struct.Struct("@hhqqi4x")  # struct flock on x86-64: l_type, l_whence, l_start, l_len, l_pid


class Permission(enum.IntEnum):
    """QEMU's BLK_PERM_* bit numbers (include/block/block-common.h)."""

    CONSISTENT_READ = 0
    WRITE = 1
    WRITE_UNCHANGED = 2
    RESIZE = 3


_NAMES = {Permission.CONSISTENT_READ: "consistent read", Permission.WRITE: "write",
          Permission.WRITE_UNCHANGED: "write unchanged", Permission.RESIZE: "resize"}


def _flock(fd: int, cmd: int, ltype: int, start: int) -> tuple[int, int]:
    out = fcntl.fcntl(fd, cmd, _FLOCK.pack(ltype, os.SEEK_SET, start, 1, 0))
    ltype, _, _, _, pid = _FLOCK.unpack(out)
    return ltype, pid


def _is_locked_by_other(fd: int, byte: int) -> bool:
    """F_OFD_GETLK for an exclusive lock on `byte`: does any other open file description hold it?"""
    ltype, _ = _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte)
    return ltype != fcntl.F_UNLCK


def lock_holders(path: str | os.PathLike[str], byte: int) -> list[int]:
    """Pids of processes having `path` open with an OFD or POSIX lock covering `byte` (from /proc/*/fdinfo)."""
    st = os.stat(path)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: list[int] = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = list((pid_dir / "fd").iterdir())
        except OSError:
            continue  # another user's process, or gone
        for fd in fds:
            try:
                fst = os.stat(fd)
                if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                    continue
                info = (pid_dir / "fdinfo" / fd.name).read_text()
            except OSError:
                continue
            for line in info.splitlines():
                # lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:2335752 100 100
                parts = line.split()
                if parts[:1] == ["lock:"] and len(parts) >= 8 and parts[-3] == want:
                    start, end = int(parts[-2]), parts[-1]
                    if start <= byte and (end == "EOF" or byte <= int(end)):
                        if int(pid_dir.name) not in pids:
                            pids.append(int(pid_dir.name))
    return pids


@dataclass
class ImageLock:
    """The lock bytes one open image holds on its fd; released by `release()` or by closing the fd."""

    fd: int
    path: Path
    write: bool

    @property
    def held(self) -> set[Permission]:
        return ({Permission.CONSISTENT_READ, Permission.WRITE, Permission.RESIZE} if self.write
                else {Permission.CONSISTENT_READ})

    @property
    def unshared(self) -> set[Permission]:
        return {Permission.WRITE, Permission.RESIZE}

    @classmethod
    def acquire(cls, fd: int, path: str | os.PathLike[str], *, write: bool) -> ImageLock:
        """Take the bytes for a writer or a reader; ImageLockedError (naming the holder's pid) on a conflict."""
        lock = cls(fd, Path(path), write)
        try:
            for p in lock.held:
                _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, LOCK_PERM_BASE + p)
            for p in lock.unshared:
                _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, LOCK_SHARED_BASE + p)
        except OSError as e:
            lock.release()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                lock._raise_conflict()
            raise StorageError(f"{path}: cannot lock the image: {e.strerror}") from None
        try:
            lock._check()
        except BaseException:
            lock.release()
            raise
        return lock

    def _check(self) -> None:
        for p in self.held:  # someone refuses to share a permission we hold
            if _is_locked_by_other(self.fd, LOCK_SHARED_BASE + p):
                self._conflict(p, LOCK_SHARED_BASE + p)
        for p in self.unshared:  # someone holds a permission we refuse to share
            if _is_locked_by_other(self.fd, LOCK_PERM_BASE + p):
                self._conflict(p, LOCK_PERM_BASE + p)

    def _raise_conflict(self) -> None:
        self._check()
        raise ImageLockedError(f"{self.path}: locked by another process")

    def _conflict(self, perm: Permission, byte: int) -> None:
        holders = lock_holders(self.path, byte)
        who = ", ".join(f"pid {p}" + (" (this process, another open)" if p == os.getpid() else "") for p in holders)
        who = who or "another process (pid not visible)"
        mode = "write" if self.write else "read-only"
        theirs = "uses it" if byte < LOCK_SHARED_BASE else "refuses to share it for writing"
        raise ImageLockedError(f"{self.path}: cannot open for {mode} access: {who} {theirs} "
                               f"(\"{_NAMES[perm]}\" lock, byte {byte}); stop it or open a copy or an overlay")

    def release(self) -> None:
        if self.fd < 0:
            return
        for byte in (100, 101, 103, 201, 203):
            try:
                _flock(self.fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, byte)
            except OSError:
                pass
        self.fd = -1


__all__ = ["ImageLock", "LOCK_PERM_BASE", "LOCK_SHARED_BASE", "Permission", "lock_holders"]
