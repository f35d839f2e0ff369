"""Initramfs images in the kernel's cpio "newc" format, written in pure Python.

Format (Documentation/driver-api/early-userspace/buffer-format.rst): each
member is a 110-byte ASCII header -- the magic "070701" and 13 fields of 8
hex digits -- then the NUL-terminated name, padded to a multiple of 4 bytes
counted from the start of the header, then the data, padded to 4 bytes. The
archive ends with a member named "TRAILER!!!". The kernel unpacks it into
rootfs before running /init; it accepts it uncompressed (the fastest on this
project's emulated CPU) or compressed with any decompressor it was built
with (the kvmpy guest kernel has gzip only).

`Initramfs` builds an archive from directories, files, symlinks and device
nodes; `build_busybox_initramfs` packs Debian's static busybox with an /init
script into a cached image.
"""

from __future__ import annotations

import gzip
import hashlib
import stat
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Mapping

from ..cache import cache_root, store

NEWC_MAGIC = b"070701"
TRAILER_NAME = "TRAILER!!!"
HEADER_SIZE = 110
_MAX_FIELD = 0xFFFFFFFF  # each header field is 8 hex digits

BUSYBOX_PATH = Path("/bin/busybox")

# The applets that get a symlink in the image. The kernel unpacks every
# member with emulated code (~1000x slower than hardware here), so linking
# all ~270 applets would cost seconds of boot; others stay reachable as
# `busybox <applet>`, or `busybox --install -s` from /init.
DEFAULT_APPLETS: tuple[str, ...] = (
    "sh", "ash", "mount", "umount", "echo", "cat", "ls", "uname", "poweroff", "reboot",
    "halt", "setsid", "cttyhack", "mkdir", "rm", "cp", "mv", "ln", "ps", "dmesg", "sleep",
    "ip", "ifconfig", "route", "ping", "hostname", "grep", "sed", "head", "tail", "wc",
    "env", "printf", "test", "[", "true", "false", "chmod", "sync", "mknod", "df", "free",
    "kill", "stty", "tty", "date", "seq", "dd", "hexdump", "nc",
)

# Printed by DEFAULT_INIT once user space runs: tests and the VMM wait for it.
INIT_MARKER = "KVMPY-INIT-OK"

DEFAULT_INIT = f"""#!/bin/sh
# kvmpy default /init (PID 1): mount the kernel file systems, announce
# that user space is up, give the console an interactive shell, and power
# off when that shell exits (PID 1 must never exit: the kernel would panic).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
echo {INIT_MARKER}
# cttyhack finds the real console device (e.g. /dev/ttyS0) and makes it the
# controlling tty, so job control and Ctrl-C work; setsid gives it a session.
if [ -x /bin/cttyhack ]; then
    setsid cttyhack sh
else
    sh
fi
poweroff -f
"""

# The device nodes the kernel needs before devtmpfs is mounted: it opens
# /dev/console for init's stdin/stdout/stderr before running /init.
DEFAULT_DEVICES: tuple[tuple[str, int, int, int], ...] = (
    ("/dev/console", 5, 1, 0o600),
    ("/dev/ttyS0", 4, 64, 0o660),
    ("/dev/null", 1, 3, 0o666),
)
DEFAULT_DIRECTORIES: tuple[str, ...] = ("/dev", "/proc", "/sys", "/tmp", "/root", "/etc")


class InitramfsError(ValueError):
    """An initramfs member or input is invalid; the message names it and the fix."""


@dataclass(frozen=True)
class CpioEntry:
    """One archive member; `mode` includes the file type bits (S_IFREG, ...)."""

    name: str          # relative path, no leading "/" (as the kernel expects)
    mode: int
    data: bytes = b""  # file contents, or the target of a symlink
    uid: int = 0
    gid: int = 0
    mtime: int = 0     # 0 keeps images reproducible (and their content hash stable)
    rdev_major: int = 0
    rdev_minor: int = 0

    @property
    def nlink(self) -> int:
        # A directory has "." and its entry in the parent; hard links are not used.
        return 2 if stat.S_ISDIR(self.mode) else 1


def newc_header(entry: CpioEntry, ino: int) -> bytes:
    """The 110-byte newc header of one member."""
    name_size = len(entry.name.encode()) + 1  # includes the terminating NUL
    fields = (
        ino, entry.mode, entry.uid, entry.gid, entry.nlink, entry.mtime, len(entry.data),
        0, 0,  # devmajor/devminor of the file system holding it: meaningless here
        entry.rdev_major, entry.rdev_minor, name_size,
        0,     # check: only used by the "070702" CRC format
    )
    for value in fields:
        if not 0 <= value <= _MAX_FIELD:
            raise InitramfsError(f"{entry.name}: header field {value} does not fit in 32 bits")
    return NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def encode_entry(entry: CpioEntry, ino: int) -> bytes:
    """Header + name + NUL + padding + data + padding."""
    head = newc_header(entry, ino) + entry.name.encode() + b"\0"
    return head + _pad4(len(head)) + entry.data + _pad4(len(entry.data))


def encode_trailer(ino: int = 0) -> bytes:
    return encode_entry(CpioEntry(name=TRAILER_NAME, mode=0), ino)


def normalize_path(path: str | PurePosixPath) -> str:
    """'/bin/sh' -> 'bin/sh'; rejects paths that could escape the root or are empty."""
    text = str(path)
    if "\0" in text:
        raise InitramfsError(f"{text!r}: NUL in an initramfs path")
    parts = [p for p in PurePosixPath(text).parts if p not in ("/", ".")]
    if not parts:
        raise InitramfsError(f"{text!r}: empty initramfs path; name a file such as '/init'")
    if ".." in parts:
        raise InitramfsError(f"{text!r}: '..' is not allowed in an initramfs path")
    name = "/".join(parts)
    if name == TRAILER_NAME:
        raise InitramfsError(f"{text!r}: reserved name (it marks the end of a cpio archive)")
    return name


def _check_permissions(path: str, mode: int) -> int:
    if not 0 <= mode <= 0o7777:
        raise InitramfsError(f"{path}: mode {mode:#o} is not a permission mode (0 to 0o7777)")
    return mode


class Initramfs:
    """An initramfs under construction; members keep the order they were added.

    Parent directories are added automatically (mode 0755) before a member
    that needs them, because the kernel's unpacker does not create them.
    """

    def __init__(self) -> None:
        self._entries: dict[str, CpioEntry] = {}

    # -- adding members --------------------------------------------------

    def add_directory(self, path: str, mode: int = 0o755, *, uid: int = 0, gid: int = 0) -> None:
        name = normalize_path(path)
        self._add(CpioEntry(name, stat.S_IFDIR | _check_permissions(name, mode), uid=uid, gid=gid))

    def add_file(self, path: str, content: bytes | Path, mode: int | None = None, *,
                 uid: int = 0, gid: int = 0) -> None:
        """A regular file from bytes, or copied from a host path (mode defaults to the host's)."""
        name = normalize_path(path)
        data, default_mode = self._file_content(name, content)
        perms = _check_permissions(name, default_mode if mode is None else mode)
        self._add(CpioEntry(name, stat.S_IFREG | perms, data, uid=uid, gid=gid))

    def add_symlink(self, path: str, target: str, *, uid: int = 0, gid: int = 0) -> None:
        name = normalize_path(path)
        if not target or "\0" in target:
            raise InitramfsError(f"{name}: symlink target {target!r} must be a non-empty path")
        self._add(CpioEntry(name, stat.S_IFLNK | 0o777, target.encode(), uid=uid, gid=gid))

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600, *,
                        uid: int = 0, gid: int = 0) -> None:
        self._add_device(path, stat.S_IFCHR, major, minor, mode, uid, gid)

    def add_block_device(self, path: str, major: int, minor: int, mode: int = 0o600, *,
                         uid: int = 0, gid: int = 0) -> None:
        self._add_device(path, stat.S_IFBLK, major, minor, mode, uid, gid)

    def _add_device(self, path: str, kind: int, major: int, minor: int, mode: int,
                    uid: int, gid: int) -> None:
        name = normalize_path(path)
        # Linux's dev_t: 12-bit major, 20-bit minor.
        if not (0 <= major < 1 << 12 and 0 <= minor < 1 << 20):
            raise InitramfsError(f"{name}: device number {major}:{minor} out of range "
                                 f"(major < 4096, minor < 1048576)")
        perms = _check_permissions(name, mode)
        self._add(CpioEntry(name, kind | perms, uid=uid, gid=gid,
                            rdev_major=major, rdev_minor=minor))

    @staticmethod
    def _file_content(name: str, content: bytes | Path) -> tuple[bytes, int]:
        if isinstance(content, (bytes, bytearray, memoryview)):
            return bytes(content), 0o644
        if isinstance(content, Path):
            try:
                st = content.stat()
                if not stat.S_ISREG(st.st_mode):
                    raise InitramfsError(f"{name}: host path {content} is not a regular file")
                return content.read_bytes(), stat.S_IMODE(st.st_mode)
            except OSError as exc:
                raise InitramfsError(f"{name}: cannot read host file {content}: {exc}") from exc
        raise TypeError(f"{name}: file content must be bytes or a pathlib.Path, not "
                        f"{type(content).__name__} (encode text with .encode())")

    def _add(self, entry: CpioEntry) -> None:
        if entry.name in self._entries:
            raise InitramfsError(f"/{entry.name}: already in the initramfs; add each path once")
        self._add_parents(entry.name)
        self._entries[entry.name] = entry

    def _add_parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            parent = "/".join(parts[:depth])
            existing = self._entries.get(parent)
            if existing is None:
                self._entries[parent] = CpioEntry(parent, stat.S_IFDIR | 0o755)
            elif not stat.S_ISDIR(existing.mode):
                raise InitramfsError(f"/{name}: parent /{parent} is not a directory")

    # -- reading back ----------------------------------------------------

    def __contains__(self, path: str) -> bool:
        return normalize_path(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[CpioEntry]:
        return iter(self._entries.values())

    def entry(self, path: str) -> CpioEntry:
        name = normalize_path(path)
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"/{name}: not in the initramfs") from None

    # -- output ----------------------------------------------------------

    def to_bytes(self, *, compress: bool = False) -> bytes:
        """The archive; gzip-compressed (reproducibly: mtime 0) if compress is set."""
        chunks = [encode_entry(e, ino) for ino, e in enumerate(self._entries.values(), start=1)]
        chunks.append(encode_trailer())
        raw = b"".join(chunks)
        return gzip.compress(raw, compresslevel=9, mtime=0) if compress else raw

    def write(self, path: Path, *, compress: bool = False) -> Path:
        """Write the archive atomically (temp file + rename)."""
        path = Path(path)
        store(path, self.to_bytes(compress=compress))
        return path


# --------------------------------------------------------------------------
# busybox
# --------------------------------------------------------------------------

_PT_INTERP = 3
_PT_DYNAMIC = 2
_EM_X86_64 = 62


def check_static_x86_64_elf(path: Path) -> None:
    """Raise unless path is an x86-64 ELF executable with no dynamic loader."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InitramfsError(f"{path}: cannot read ({exc.strerror}); install it with "
                             f"`apt-get install busybox-static`") from exc
    if data[:4] != b"\x7fELF" or len(data) < 64:
        raise InitramfsError(f"{path}: not an ELF executable")
    if data[4] != 2 or data[5] != 1:
        raise InitramfsError(f"{path}: not a 64-bit little-endian ELF; the guest is x86_64")
    machine = struct.unpack_from("<H", data, 18)[0]
    if machine != _EM_X86_64:
        raise InitramfsError(f"{path}: ELF machine {machine}, not x86-64 ({_EM_X86_64})")
    for p_type in _program_header_types(data):
        if p_type in (_PT_INTERP, _PT_DYNAMIC):
            raise InitramfsError(
                f"{path}: dynamically linked, but the initramfs has no C library; install "
                f"the static build with `apt-get install busybox-static`"
            )


def _program_header_types(elf: bytes) -> Iterator[int]:
    phoff = struct.unpack_from("<Q", elf, 32)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    for i in range(phnum):
        offset = phoff + i * phentsize
        if offset + 4 > len(elf):
            raise InitramfsError("ELF program header table is truncated")
        yield struct.unpack_from("<I", elf, offset)[0]


def busybox_applet_paths(busybox: Path = BUSYBOX_PATH) -> dict[str, str]:
    """{applet: standard install path} from `busybox --list-full` ('sbin/poweroff')."""
    try:
        out = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                             check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise InitramfsError(f"{busybox}: `--list-full` failed ({exc}); is it busybox?") from exc
    paths = {PurePosixPath(line).name: line.strip() for line in out.splitlines() if line.strip()}
    if not paths:
        raise InitramfsError(f"{busybox}: `--list-full` listed no applets")
    return paths


def add_busybox(image: Initramfs, busybox: Path = BUSYBOX_PATH,
                applets: Iterable[str] = DEFAULT_APPLETS) -> None:
    """/bin/busybox plus a symlink per applet, at busybox's standard location."""
    check_static_x86_64_elf(busybox)
    image.add_file("/bin/busybox", busybox, mode=0o755)
    available = busybox_applet_paths(busybox)
    missing = [a for a in applets if a not in available]
    if missing:
        raise InitramfsError(f"{busybox}: has no applet(s) {', '.join(missing)}; "
                             f"drop them from applets= or use a fuller busybox build")
    for applet in applets:
        location = available[applet]
        if location != "bin/busybox":
            image.add_symlink(location, "/bin/busybox")


def busybox_initramfs(init_script: str = DEFAULT_INIT, *,
                      extra_files: Mapping[str, bytes] | None = None,
                      busybox: Path = BUSYBOX_PATH,
                      applets: Iterable[str] = DEFAULT_APPLETS) -> Initramfs:
    """The busybox image in memory: dirs, device nodes, busybox, /init, extra files."""
    if not init_script.startswith("#!"):
        raise InitramfsError("init_script: must start with an interpreter line such as "
                             "'#!/bin/sh' (the kernel execs /init directly)")
    image = Initramfs()
    for directory in DEFAULT_DIRECTORIES:
        image.add_directory(directory, 0o1777 if directory == "/tmp" else 0o755)
    for path, major, minor, mode in DEFAULT_DEVICES:
        image.add_char_device(path, major, minor, mode)
    add_busybox(image, busybox, applets)
    image.add_file("/init", init_script.encode(), mode=0o755)
    for path, data in (extra_files or {}).items():
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"extra_files[{path!r}]: must be bytes, not {type(data).__name__}")
        # Scripts are meant to be run: give "#!" files the execute bits.
        image.add_file(path, bytes(data), mode=0o755 if data.startswith(b"#!") else 0o644)
    return image


def build_busybox_initramfs(init_script: str = DEFAULT_INIT, *,
                            extra_files: dict[str, bytes] | None = None,
                            compress: bool = False,
                            cache_dir: Path | None = None) -> Path:
    """Write (or reuse) the busybox initramfs; the file name is its content hash.

    Uncompressed by default: on this project's emulated guest CPU, gunzip in
    the kernel costs seconds of boot.
    """
    image = busybox_initramfs(init_script, extra_files=extra_files)
    data = image.to_bytes(compress=compress)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    suffix = ".cpio.gz" if compress else ".cpio"
    path = root / f"initramfs-{hashlib.sha256(data).hexdigest()[:16]}{suffix}"
    if path.is_file() and path.stat().st_size == len(data):
        return path
    store(path, data)
    return path
