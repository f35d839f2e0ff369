"""kvmpy.boot.initramfs: the newc writer, checked byte by byte and against the system cpio."""

from __future__ import annotations

import gzip
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from kvmpy.boot.initramfs import (
    BUSYBOX_PATH,
    DEFAULT_INIT,
    DEFAULT_INITTAB,
    INIT_MARKER,
    CpioEntry,
    Initramfs,
    InitramfsError,
    build_busybox_initramfs,
    busybox_applet_paths,
    busybox_initramfs,
    check_static_x86_64_elf,
    encode_entry,
    newc_header,
    normalize_path,
)

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None,
                                reason="system cpio not installed (apt-get install cpio)")
needs_busybox = pytest.mark.skipif(not BUSYBOX_PATH.is_file(),
                                   reason=f"{BUSYBOX_PATH} missing (apt-get install busybox-static)")


def parse_newc(archive: bytes) -> list[tuple[dict[str, int], str, bytes]]:
    """An independent reader: (fields, name, data) per member, checking alignment."""
    names = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor",
             "devminor", "rdevmajor", "rdevminor", "namesize", "check")
    members = []
    pos = 0
    while True:
        assert pos % 4 == 0, f"member at {pos} is not 4-byte aligned"
        assert archive[pos:pos + 6] == b"070701"
        fields = {n: int(archive[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i, n in enumerate(names)}
        name_start = pos + 110
        name = archive[name_start:name_start + fields["namesize"] - 1].decode()
        assert archive[name_start + fields["namesize"] - 1] == 0
        data_start = (name_start + fields["namesize"] + 3) & ~3
        data = archive[data_start:data_start + fields["filesize"]]
        members.append((fields, name, data))
        pos = (data_start + fields["filesize"] + 3) & ~3
        if name == "TRAILER!!!":
            assert pos == len(archive), "bytes after the trailer"
            return members


def sample_image() -> Initramfs:
    image = Initramfs()
    image.add_directory("/bin")
    image.add_file("/bin/hello", b"#!/bin/sh\necho hi\n", mode=0o755)
    image.add_file("/etc/odd", b"12345", mode=0o640)  # 5 bytes: needs data padding
    image.add_symlink("/bin/sh", "/bin/busybox")
    image.add_char_device("/dev/console", 5, 1)
    image.add_char_device("/dev/ttyS0", 4, 64, 0o660)
    image.add_block_device("/dev/vda", 254, 0)
    return image


def test_header_is_110_ascii_bytes_with_magic_and_hex_fields() -> None:
    entry = CpioEntry(name="init", mode=stat.S_IFREG | 0o755, data=b"abc", mtime=7)
    header = newc_header(entry, ino=3)
    assert len(header) == 110
    assert header[:6] == b"070701"
    fields = [int(header[6 + 8 * i: 14 + 8 * i], 16) for i in range(13)]
    assert fields == [3, 0o100755, 0, 0, 1, 7, 3, 0, 0, 0, 0, 5, 0]


def test_name_and_data_are_padded_to_four_bytes() -> None:
    encoded = encode_entry(CpioEntry(name="ab", mode=stat.S_IFREG | 0o644, data=b"xyzzy"), ino=1)
    # 110 header + "ab\0" = 113 -> padded to 116; 5 data bytes -> padded to 8.
    assert encoded[110:116] == b"ab\0\0\0\0"
    assert encoded[116:124] == b"xyzzy\0\0\0"
    assert len(encoded) == 124


def test_archive_ends_with_trailer_and_members_parse_back() -> None:
    members = parse_newc(sample_image().to_bytes())
    names = [name for _, name, _ in members]
    assert names[-1] == "TRAILER!!!"
    assert names[:-1] == ["bin", "bin/hello", "etc", "etc/odd", "bin/sh", "dev", "dev/console",
                          "dev/ttyS0", "dev/vda"]
    by_name = {name: (fields, data) for fields, name, data in members}
    assert by_name["bin/sh"][1] == b"/bin/busybox"
    console = by_name["dev/console"][0]
    assert (console["rdevmajor"], console["rdevminor"]) == (5, 1)
    assert stat.S_ISCHR(console["mode"])
    assert by_name["bin"][0]["nlink"] == 2
    inodes = [fields["ino"] for fields, name, _ in members if name != "TRAILER!!!"]
    assert len(set(inodes)) == len(inodes)


def test_parent_directories_are_added_before_children() -> None:
    image = Initramfs()
    image.add_file("/a/b/c.txt", b"x")
    assert [e.name for e in image] == ["a", "a/b", "a/b/c.txt"]
    assert all(stat.S_ISDIR(image.entry(p).mode) for p in ("/a", "/a/b"))


def test_gzip_output_decompresses_to_the_plain_archive() -> None:
    image = sample_image()
    compressed = image.to_bytes(compress=True)
    assert compressed[:2] == b"\x1f\x8b"
    assert gzip.decompress(compressed) == image.to_bytes()
    assert image.to_bytes(compress=True) == compressed  # reproducible (mtime 0)


def test_duplicate_path_is_rejected() -> None:
    image = Initramfs()
    image.add_file("/init", b"x")
    with pytest.raises(InitramfsError, match="already in the initramfs"):
        image.add_file("init", b"y")


@pytest.mark.parametrize("bad", ["", "/", "../etc/passwd", "a/../../b", "TRAILER!!!", "a\0b"])
def test_bad_paths_are_rejected(bad: str) -> None:
    with pytest.raises(InitramfsError):
        normalize_path(bad)


def test_leading_slash_and_dots_are_normalized() -> None:
    assert normalize_path("/bin//./sh") == "bin/sh"


def test_file_under_a_non_directory_is_rejected() -> None:
    image = Initramfs()
    image.add_file("/x", b"")
    with pytest.raises(InitramfsError, match="not a directory"):
        image.add_file("/x/y", b"")


def test_text_content_is_rejected_with_a_hint() -> None:
    with pytest.raises(TypeError, match="encode"):
        Initramfs().add_file("/init", "#!/bin/sh")  # type: ignore[arg-type]


def test_out_of_range_mode_and_device_numbers_are_rejected() -> None:
    image = Initramfs()
    with pytest.raises(InitramfsError, match="mode"):
        image.add_file("/f", b"", mode=0o10000)
    with pytest.raises(InitramfsError, match="device number"):
        image.add_char_device("/dev/x", 4096, 0)


def test_host_file_keeps_its_mode_and_contents(tmp_path: Path) -> None:
    host = tmp_path / "tool"
    host.write_bytes(b"\x7fELF...")
    host.chmod(0o750)
    image = Initramfs()
    image.add_file("/bin/tool", host)
    entry = image.entry("/bin/tool")
    assert entry.data == b"\x7fELF..." and entry.mode == stat.S_IFREG | 0o750


def test_missing_host_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(InitramfsError, match="nope"):
        Initramfs().add_file("/x", tmp_path / "nope")


def test_write_creates_the_file_atomically(tmp_path: Path) -> None:
    out = sample_image().write(tmp_path / "sub" / "initrd.cpio")
    assert out.read_bytes() == sample_image().to_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["initrd.cpio"]


@needs_cpio
def test_system_cpio_lists_names_types_and_modes(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    sample_image().write(archive)
    out = subprocess.run(["cpio", "-itv", "--quiet"], stdin=archive.open("rb"),
                         capture_output=True, text=True, check=True).stdout
    lines = {line.split()[-1] if "->" not in line else line.split()[-3]: line
             for line in out.splitlines()}
    assert lines["bin/hello"].startswith("-rwxr-xr-x")
    assert lines["etc/odd"].startswith("-rw-r-----")
    assert lines["bin"].startswith("drwxr-xr-x")
    assert lines["bin/sh"].startswith("lrwxrwxrwx") and lines["bin/sh"].endswith("-> /bin/busybox")
    assert lines["dev/console"].startswith("crw-------")
    assert device_numbers(lines["dev/console"]) == "5,1"
    assert lines["dev/ttyS0"].startswith("crw-rw----")
    assert device_numbers(lines["dev/ttyS0"]) == "4,64"
    assert lines["dev/vda"].startswith("brw-------")
    assert device_numbers(lines["dev/vda"]) == "254,0"


def device_numbers(listing_line: str) -> str:
    """'crw------- 1 root root   5,   1 Jan ...' -> '5,1' (cpio pads the columns)."""
    fields = listing_line.split()
    return (fields[4] + fields[5]).replace(" ", "")


@needs_cpio
def test_system_cpio_extracts_contents_and_modes(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    sample_image().write(archive)
    dest = tmp_path / "root"
    dest.mkdir()
    # Device nodes are left out: mknod may be refused in a container.
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames", "bin", "bin/*",
                    "etc", "etc/*"], stdin=archive.open("rb"), cwd=dest, check=True)
    assert (dest / "bin/hello").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((dest / "bin/hello").stat().st_mode) == 0o755
    assert (dest / "etc/odd").read_bytes() == b"12345"
    assert stat.S_IMODE((dest / "etc/odd").stat().st_mode) == 0o640
    assert (dest / "bin/sh").is_symlink() and (dest / "bin/sh").readlink() == Path("/bin/busybox")


def fake_elf(*, program_types: list[int], machine: int = 62) -> bytes:
    """A minimal ELF64 header plus program headers of the given types."""
    phoff, phentsize = 64, 56
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<H", header, 18, machine)
    struct.pack_into("<Q", header, 32, phoff)
    struct.pack_into("<HH", header, 54, phentsize, len(program_types))
    phdrs = b"".join(struct.pack("<I", t) + bytes(phentsize - 4) for t in program_types)
    return bytes(header) + phdrs


def test_static_elf_passes_the_check(tmp_path: Path) -> None:
    exe = tmp_path / "busybox"
    exe.write_bytes(fake_elf(program_types=[1, 1, 4]))
    check_static_x86_64_elf(exe)


def test_dynamic_elf_is_rejected_with_the_package_to_install(tmp_path: Path) -> None:
    exe = tmp_path / "busybox"
    exe.write_bytes(fake_elf(program_types=[6, 3, 1, 2]))
    with pytest.raises(InitramfsError, match="apt-get install busybox-static"):
        check_static_x86_64_elf(exe)


def test_non_x86_64_or_non_elf_is_rejected(tmp_path: Path) -> None:
    exe = tmp_path / "busybox"
    exe.write_bytes(fake_elf(program_types=[1], machine=183))
    with pytest.raises(InitramfsError, match="x86-64"):
        check_static_x86_64_elf(exe)
    exe.write_bytes(b"#!/bin/sh\n" + bytes(64))
    with pytest.raises(InitramfsError, match="not an ELF"):
        check_static_x86_64_elf(exe)


def test_init_script_without_interpreter_line_is_rejected() -> None:
    with pytest.raises(InitramfsError, match="#!/bin/sh"):
        busybox_initramfs("echo hi\n")


def test_default_init_mounts_prints_marker_and_hands_pid_1_to_busybox_init() -> None:
    for needed in ("mount -t proc", "mount -t sysfs", "mount -t devtmpfs", INIT_MARKER):
        assert needed in DEFAULT_INIT
    # busybox's poweroff/reboot/halt (without -f) signal PID 1: it must be busybox init, by exec.
    commands = [l for l in DEFAULT_INIT.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    assert commands[-1] == "exec /bin/busybox init"


def test_default_inittab_runs_the_console_shell_once_and_powers_off_after_it() -> None:
    entries = [l for l in DEFAULT_INITTAB.splitlines() if l.strip() and not l.startswith("#")]
    (entry,) = entries
    tty, runlevels, action, command = entry.split(":", 3)
    assert (tty, runlevels, action) == ("", "", "once")  # the console; not respawned
    assert "setsid cttyhack sh" in command
    # `poweroff` without -f: init runs its shutdown (TERM, KILL, sync) as for a typed poweroff.
    assert command.rstrip("'").endswith("; poweroff")


@needs_busybox
def test_busybox_image_has_the_inittab_and_busybox_has_init() -> None:
    assert "init" in busybox_applet_paths()
    image = busybox_initramfs()
    assert image.entry("/etc/inittab").data == DEFAULT_INITTAB.encode()
    mine = busybox_initramfs(extra_files={"/etc/inittab": b"::once:/bin/sh\n"})
    assert mine.entry("/etc/inittab").data == b"::once:/bin/sh\n"


@needs_busybox
def test_busybox_image_has_init_busybox_applets_and_devices() -> None:
    image = busybox_initramfs(extra_files={"/etc/motd": b"hello\n", "/bin/t": b"#!/bin/sh\n"})
    assert image.entry("/init").mode == stat.S_IFREG | 0o755
    assert image.entry("/init").data == DEFAULT_INIT.encode()
    assert image.entry("/bin/busybox").data == BUSYBOX_PATH.read_bytes()
    assert image.entry("/bin/sh").data == b"/bin/busybox"
    assert stat.S_ISLNK(image.entry("/sbin/poweroff").mode)
    assert image.entry("/dev/console").rdev_major == 5
    assert image.entry("/tmp").mode == stat.S_IFDIR | 0o1777
    assert image.entry("/etc/motd").mode == stat.S_IFREG | 0o644
    assert image.entry("/bin/t").mode == stat.S_IFREG | 0o755


@needs_busybox
def test_busybox_initramfs_is_cached_by_content(tmp_path: Path) -> None:
    first = build_busybox_initramfs(cache_dir=tmp_path)
    mtime = first.stat().st_mtime_ns
    again = build_busybox_initramfs(cache_dir=tmp_path)
    assert again == first and again.stat().st_mtime_ns == mtime
    other = build_busybox_initramfs("#!/bin/sh\npoweroff -f\n", cache_dir=tmp_path)
    assert other != first
    gz = build_busybox_initramfs(cache_dir=tmp_path, compress=True)
    assert gz.name.endswith(".cpio.gz") and gzip.decompress(gz.read_bytes()) == first.read_bytes()


@needs_busybox
@needs_cpio
def test_busybox_initramfs_extracts_with_system_cpio(tmp_path: Path) -> None:
    archive = build_busybox_initramfs(cache_dir=tmp_path)
    dest = tmp_path / "root"
    dest.mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "init", "bin", "bin/*"],
                   stdin=archive.open("rb"), cwd=dest, check=True)
    assert (dest / "init").read_text() == DEFAULT_INIT
    assert (dest / "bin/busybox").read_bytes() == BUSYBOX_PATH.read_bytes()
    # The extracted busybox runs on the host: its bytes survived intact.
    out = subprocess.run([str(dest / "bin/busybox"), "echo", "ok"], capture_output=True,
                         text=True, check=True).stdout
    assert out == "ok\n"
