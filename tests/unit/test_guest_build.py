"""kvmpy.guest.build: fragment parsing, the dropped-option check and cache keying.

None of these build a kernel. The last test inspects the real artifacts when
a build for the current inputs is already in the cache, and skips otherwise.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from kvmpy.cache import cache_root
from kvmpy.guest import build
from kvmpy.guest.build import (
    BUILD_RECIPE_VERSION,
    FRAGMENT_PATH,
    ConfigFragmentError,
    DroppedOption,
    DroppedOptionsError,
    GuestBuildError,
    SourceTarball,
    cache_key,
    check_fragment_applied,
    find_dropped_options,
    find_linux_source,
    load_cached_kernel,
    parse_config_fragment,
    parse_dotconfig,
)

FAKE_FRAGMENT = """\
# comment lines and blank lines are ignored

CONFIG_SERIAL_8250=y
CONFIG_SERIAL_8250_NR_UARTS=1
CONFIG_CMDLINE="console=ttyS0"
# CONFIG_PCI is not set
# CONFIG_ACPI is not set
"""


def test_fragment_parses_values_and_unset_lines() -> None:
    assert parse_config_fragment(FAKE_FRAGMENT) == {
        "CONFIG_SERIAL_8250": "y",
        "CONFIG_SERIAL_8250_NR_UARTS": "1",
        "CONFIG_CMDLINE": '"console=ttyS0"',
        "CONFIG_PCI": "n",
        "CONFIG_ACPI": "n",
    }


def test_malformed_fragment_line_is_reported_with_its_line_number() -> None:
    with pytest.raises(ConfigFragmentError, match=r"frag:2: not a kconfig line"):
        parse_config_fragment("CONFIG_A=y\nSERIAL_8250=y\n", origin="frag")


def test_option_given_twice_is_rejected() -> None:
    with pytest.raises(ConfigFragmentError, match="CONFIG_A is given twice"):
        parse_config_fragment("CONFIG_A=y\n# CONFIG_A is not set\n")


def test_project_fragment_parses_and_has_the_micro_vm_contract() -> None:
    options = parse_config_fragment(FRAGMENT_PATH.read_text(), origin=str(FRAGMENT_PATH))
    wanted_on = ["CONFIG_64BIT", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_VIRTIO_MMIO",
                 "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES", "CONFIG_VIRTIO_BLK", "CONFIG_VIRTIO_NET",
                 "CONFIG_VIRTIO_VSOCKETS", "CONFIG_HW_RANDOM_VIRTIO", "CONFIG_EXT4_FS",
                 "CONFIG_DEVTMPFS_MOUNT", "CONFIG_BLK_DEV_INITRD", "CONFIG_RD_GZIP",
                 "CONFIG_KVM_GUEST", "CONFIG_PVH", "CONFIG_SMP", "CONFIG_X86_MPPARSE",
                 "CONFIG_IP_PNP", "CONFIG_UNIX", "CONFIG_BINFMT_SCRIPT", "CONFIG_FUTEX",
                 "CONFIG_EPOLL", "CONFIG_POSIX_TIMERS", "CONFIG_PRINTK_TIME"]
    assert {name: options.get(name) for name in wanted_on} == {name: "y" for name in wanted_on}
    assert options["CONFIG_SERIAL_8250_NR_UARTS"] == "1"
    assert options["CONFIG_SERIAL_8250_RUNTIME_UARTS"] == "1"
    wanted_off = ["CONFIG_PCI", "CONFIG_ACPI", "CONFIG_MODULES", "CONFIG_FTRACE",
                  "CONFIG_KPROBES", "CONFIG_SOUND", "CONFIG_USB_SUPPORT", "CONFIG_DRM",
                  "CONFIG_RD_XZ", "CONFIG_RD_ZSTD", "CONFIG_RD_LZ4", "CONFIG_KERNEL_XZ"]
    assert {name: options.get(name) for name in wanted_off} == {name: "n" for name in wanted_off}


def test_dotconfig_parser_reads_kconfig_output() -> None:
    text = "#\n# Automatically generated file\n#\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=64\n"
    assert parse_dotconfig(text) == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "64"}


FAKE_FINAL_CONFIG = """\
CONFIG_SERIAL_8250_NR_UARTS=4
CONFIG_CMDLINE="console=ttyS0"
CONFIG_PCI=y
"""


def test_dropped_changed_and_forced_on_options_are_all_found() -> None:
    dropped = find_dropped_options(parse_config_fragment(FAKE_FRAGMENT),
                                   parse_dotconfig(FAKE_FINAL_CONFIG))
    assert dropped == [
        DroppedOption("CONFIG_SERIAL_8250", "y", None),        # dependency missing
        DroppedOption("CONFIG_SERIAL_8250_NR_UARTS", "1", "4"),  # value overridden
        DroppedOption("CONFIG_PCI", "n", "y"),                 # forced on by a select
    ]  # CONFIG_ACPI: absent counts as "not set", so it is not reported


def test_fully_applied_fragment_passes_the_check() -> None:
    final = FAKE_FRAGMENT.replace("# CONFIG_PCI is not set\n", "")
    check_fragment_applied(FAKE_FRAGMENT, final, config_path="x/.config")


def test_check_fails_naming_each_dropped_option(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DroppedOptionsError) as info:
        check_fragment_applied(FAKE_FRAGMENT, FAKE_FINAL_CONFIG, config_path="obj/.config")
    message = str(info.value)
    assert "obj/.config: 3 option(s)" in message
    assert "CONFIG_SERIAL_8250: wanted =y, got absent" in message
    assert "CONFIG_SERIAL_8250_NR_UARTS: wanted =1, got =4" in message
    assert "CONFIG_PCI: wanted is not set, got =y" in message
    assert [d.name for d in info.value.dropped] == [
        "CONFIG_SERIAL_8250", "CONFIG_SERIAL_8250_NR_UARTS", "CONFIG_PCI"]


def fake_source(tmp_path: Path, name: str = "linux-source-6.1.tar.xz",
                content: bytes = b"tarball") -> SourceTarball:
    path = tmp_path / name
    path.write_bytes(content)
    os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    return SourceTarball.from_path(path)


def test_cache_key_is_16_hex_digits_and_stable(tmp_path: Path) -> None:
    source = fake_source(tmp_path)
    key = cache_key(b"CONFIG_A=y\n", source)
    assert len(key) == 16 and int(key, 16) >= 0
    assert cache_key(b"CONFIG_A=y\n", SourceTarball.from_path(source.path)) == key


def test_cache_key_changes_with_every_input(tmp_path: Path) -> None:
    source = fake_source(tmp_path)
    base = cache_key(b"CONFIG_A=y\n", source)
    renamed = SourceTarball(tmp_path / "linux-source-6.2.tar.xz", source.size, source.mtime_ns)
    resized = SourceTarball(source.path, source.size + 1, source.mtime_ns)
    touched = SourceTarball(source.path, source.size, source.mtime_ns + 1)
    variants = {
        cache_key(b"CONFIG_A=n\n", source),
        cache_key(b"CONFIG_A=y\n", renamed),
        cache_key(b"CONFIG_A=y\n", resized),
        cache_key(b"CONFIG_A=y\n", touched),
        cache_key(b"CONFIG_A=y\n", source, recipe_version=BUILD_RECIPE_VERSION + 1),
    }
    assert base not in variants and len(variants) == 5


def test_cache_key_ignores_the_tarball_directory(tmp_path: Path) -> None:
    source = fake_source(tmp_path)
    moved = SourceTarball(Path("/elsewhere") / source.path.name, source.size, source.mtime_ns)
    assert cache_key(b"x", moved) == cache_key(b"x", source)


def test_cache_root_precedence(tmp_path: Path) -> None:
    assert cache_root({"KVMPY_CACHE": "/c", "XDG_CACHE_HOME": "/x"}) == Path("/c")
    assert cache_root({"XDG_CACHE_HOME": "/x"}) == Path("/x/kvmpy")
    assert cache_root({}) == Path.home() / ".cache" / "kvmpy"


def test_missing_linux_source_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(GuestBuildError, match="apt-get install linux-source"):
        find_linux_source(str(tmp_path / "linux-source-*.tar.xz"))


def test_newest_linux_source_wins_numerically(tmp_path: Path) -> None:
    for version in ("6.9", "6.10", "6.1"):
        fake_source(tmp_path, f"linux-source-{version}.tar.xz")
    found = find_linux_source(str(tmp_path / "linux-source-*.tar.xz"))
    assert found.path.name == "linux-source-6.10.tar.xz"
    assert found.stem == "linux-source-6.10"


def write_fake_artifacts(directory: Path, *, manifest: bool = True) -> None:
    directory.mkdir(parents=True)
    for name in ("vmlinux", "bzImage", "System.map", "config"):
        (directory / name).write_bytes(b"x")
    if manifest:
        (directory / build.MANIFEST_NAME).write_text(json.dumps(
            {"version": "6.1.0", "banner": "Linux version 6.1.0", "build_seconds": 1.0}))


def test_build_without_completion_marker_is_not_taken_as_done(tmp_path: Path) -> None:
    write_fake_artifacts(tmp_path / "kernel-0123456789abcdef", manifest=False)
    assert load_cached_kernel(tmp_path / "kernel-0123456789abcdef") is None


def test_cached_build_is_returned_without_running_make(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = fake_source(tmp_path)
    monkeypatch.setattr(build, "find_linux_source", lambda: source)

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached kernel must not be rebuilt")

    monkeypatch.setattr(build, "_build_locked", no_build)
    monkeypatch.setattr(build, "check_host_tools", no_build)
    key = cache_key(FRAGMENT_PATH.read_bytes(), source)
    write_fake_artifacts(tmp_path / "cache" / f"kernel-{key}")
    artifacts = build.build_kernel(tmp_path / "cache")
    assert artifacts.vmlinux == tmp_path / "cache" / f"kernel-{key}" / "vmlinux"
    assert artifacts.version == "6.1.0"


def test_invalid_jobs_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="jobs=0"):
        build.build_kernel(tmp_path, jobs=0)


def test_cli_reports_errors_with_exit_code_1(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(build, "find_linux_source",
                        lambda: find_linux_source(str(tmp_path / "none-*.tar.xz")))
    assert build.main(["--cache-dir", str(tmp_path), "--no-progress"]) == 1
    assert "apt-get install linux-source" in capsys.readouterr().err


# --------------------------------------------------------------------------
# The real build, if it is in the cache
# --------------------------------------------------------------------------

XEN_ELFNOTE_PHYS32_ENTRY = 18
PT_NOTE = 4


def elf_notes(elf: bytes) -> list[tuple[bytes, int, bytes]]:
    """(name, type, desc) of every note in the PT_NOTE segments of an ELF64 file."""
    phoff = struct.unpack_from("<Q", elf, 32)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    notes = []
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != PT_NOTE:
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", elf, pos)
            name_at = pos + 12
            desc_at = name_at + ((namesz + 3) & ~3)
            notes.append((elf[name_at:name_at + namesz].rstrip(b"\0"), n_type,
                          elf[desc_at:desc_at + descsz]))
            pos = desc_at + ((descsz + 3) & ~3)
    return notes


def test_cached_kernel_is_x86_64_elf_with_pvh_note_and_full_config() -> None:
    try:
        artifacts = build.find_cached_kernel()
    except GuestBuildError as exc:
        pytest.skip(f"cannot look for a cached guest kernel: {exc}")
    if artifacts is None:
        pytest.skip("no guest kernel for the current inputs in the cache; "
                    "build it with `python -m kvmpy.guest.build`")
    elf = artifacts.vmlinux.read_bytes()
    assert elf[:4] == b"\x7fELF" and elf[4] == 2  # ELFCLASS64
    assert struct.unpack_from("<H", elf, 18)[0] == 62  # EM_X86_64
    pvh = [desc for name, n_type, desc in elf_notes(elf)
           if name == b"Xen" and n_type == XEN_ELFNOTE_PHYS32_ENTRY]
    assert len(pvh) == 1 and len(pvh[0]) in (4, 8), "vmlinux has no PVH entry note"
    check_fragment_applied(FRAGMENT_PATH.read_text(), artifacts.config.read_text(),
                           config_path=artifacts.config)
    assert artifacts.bzimage.read_bytes()[0x202:0x206] == b"HdrS"  # boot protocol header
    assert artifacts.version.startswith("6.1")
