"""Disk images for virtio-blk: an ext4 image from a host directory, and a superblock peek.

`make_ext4_image` runs e2fsprogs' `mke2fs -t ext4 -d DIR`, which copies a
directory tree into the new file system without mounting anything (no root
needed). `ext4_mount_count` reads `s_mnt_count` from the superblock, which
the kernel increments on every read-write mount: a host-side proof that a
guest mounted the image.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

from .errors import KvmError
from .memory import parse_size

SUPERBLOCK_OFFSET = 1024
EXT4_SUPER_MAGIC = 0xEF53
_S_MNT_COUNT = 0x34  # __le16 s_mnt_count
_S_MAGIC = 0x38      # __le16 s_magic


class DiskImageError(KvmError, RuntimeError):
    """An image could not be made or read; the message names the file and the fix."""


def make_ext4_image(path: str | os.PathLike[str], source_dir: str | os.PathLike[str] | None,
                    size: int | str = "64M", *, label: str = "kvmpy-root") -> Path:
    """Create (or overwrite) a raw ext4 image of `size` at `path` holding `source_dir`'s files."""
    path = Path(path)
    nbytes = parse_size(size)
    if nbytes < 1 << 20:
        raise DiskImageError(f"{path}: size {nbytes} bytes is too small for ext4 (at least 1M)")
    mke2fs = shutil.which("mke2fs") or shutil.which("mke2fs", path="/usr/sbin:/sbin")
    if mke2fs is None:
        raise DiskImageError("mke2fs not found; install it with `apt-get install e2fsprogs`")
    if source_dir is not None and not Path(source_dir).is_dir():
        raise DiskImageError(f"{source_dir}: not a directory (the tree to copy into {path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Inode tables and journal initialised here, not lazily by the guest kernel's
    # ext4lazyinit thread (emulated code on this project's hosts, and disk writes).
    cmd = [mke2fs, "-q", "-t", "ext4", "-L", label, "-E", "lazy_itable_init=0,lazy_journal_init=0", "-F"]
    if source_dir is not None:
        cmd += ["-d", str(source_dir)]
    cmd += [str(path), f"{nbytes // 1024}k"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise DiskImageError(f"{path}: mke2fs took more than 300 s") from None
    if proc.returncode != 0:
        raise DiskImageError(f"{path}: `{' '.join(cmd)}` failed ({proc.returncode}): "
                             f"{(proc.stderr or proc.stdout).strip()}")
    return path


def populate_busybox_root(directory: str | os.PathLike[str], **initramfs_options: object) -> Path:
    """Write kvmpy's busybox tree (the one its initramfs holds, /init included) into `directory`.

    The result, passed to `make_ext4_image`, is a root file system the guest
    kernel can boot with `root=/dev/vda init=/init`. Device nodes are left
    out: the kernel mounts devtmpfs on /dev itself (CONFIG_DEVTMPFS_MOUNT).
    Options are those of `kvmpy.boot.initramfs.busybox_initramfs`.
    """
    from .boot.initramfs import busybox_initramfs

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    for entry in busybox_initramfs(**initramfs_options):  # type: ignore[arg-type]
        path = root / entry.name
        if stat.S_ISDIR(entry.mode):
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(stat.S_IMODE(entry.mode))
        elif stat.S_ISLNK(entry.mode):
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink():
                path.unlink()
            path.symlink_to(entry.data.decode())
        elif stat.S_ISREG(entry.mode):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(entry.data)
            path.chmod(stat.S_IMODE(entry.mode))
    (root / "mnt").mkdir(exist_ok=True)
    return root


def _superblock(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(SUPERBLOCK_OFFSET)
            sb = f.read(1024)
    except OSError as e:
        raise DiskImageError(f"{path}: cannot read the superblock: {e.strerror}") from e
    if len(sb) < 1024 or int.from_bytes(sb[_S_MAGIC:_S_MAGIC + 2], "little") != EXT4_SUPER_MAGIC:
        raise DiskImageError(f"{path}: no ext2/3/4 superblock (magic 0xEF53) at offset 1024")
    return sb


def ext4_mount_count(path: str | os.PathLike[str]) -> int:
    """`s_mnt_count`: mounts since the last fsck (the kernel adds one per read-write mount)."""
    sb = _superblock(path)
    return int.from_bytes(sb[_S_MNT_COUNT:_S_MNT_COUNT + 2], "little")


def read_file_from_image(path: str | os.PathLike[str], guest_path: str) -> bytes:
    """The contents of `guest_path` inside the ext4 image, read with `debugfs` (no mount)."""
    debugfs = shutil.which("debugfs") or shutil.which("debugfs", path="/usr/sbin:/sbin")
    if debugfs is None:
        raise DiskImageError("debugfs not found; install it with `apt-get install e2fsprogs`")
    proc = subprocess.run([debugfs, "-R", f"cat {guest_path}", str(path)], capture_output=True, timeout=60)
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0 or "File not found" in err:
        raise DiskImageError(f"{path}: cannot read {guest_path}: {err.strip()}")
    return proc.stdout


__all__ = ["DiskImageError", "ext4_mount_count", "make_ext4_image", "populate_busybox_root", "read_file_from_image"]
