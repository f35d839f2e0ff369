"""`--share HOSTDIR[=TAG][,ro]` and `ShareConfig`: the grammar, its errors, and finding virtiofsd."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmpy.devices.virtio.fs import CONFIG, NUM_REQUEST_QUEUES
from kvmpy.microvm import ConfigError, MicroVMConfig
from kvmpy.virtiofsd import (CacheMode, Flavour, ShareConfig, ShareError, VirtiofsdBinary, VirtiofsdError,
                             daemon_argv, find_virtiofsd, parse_share_arg, validate_shares)


def test_plain_dir_takes_its_name_as_tag(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    s = parse_share_arg(str(d))
    assert s == ShareConfig(d.resolve(), "data", False, CacheMode.AUTO)


def test_tag_ro_and_cache_options(tmp_path):
    s = parse_share_arg(f"{tmp_path}=src,ro,cache=never")
    assert (s.host_dir, s.tag, s.read_only, s.cache) == (tmp_path.resolve(), "src", True, CacheMode.NEVER)


def test_qemu_cache_name_none_means_never(tmp_path):
    assert parse_share_arg(f"{tmp_path},cache=none").cache is CacheMode.NEVER


@pytest.mark.parametrize("arg, message", [
    ("/no/such/dir", "no such directory"),
    ("{tmp}=x,rw,fast", "unknown option 'fast'"),
    ("{tmp}=x,cache=sometimes", "cache 'sometimes'"),
    ("{tmp}=" + "t" * 37, "1 to 36 bytes"),
    ("=tag", "expected HOSTDIR"),
])
def test_bad_share_arguments_are_one_line_errors(tmp_path, arg, message):
    with pytest.raises(ShareError, match=message) as e:
        parse_share_arg(arg.format(tmp=tmp_path))
    assert "\n" not in str(e.value)


def test_a_file_is_not_a_share(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(ShareError, match="not a directory"):
        parse_share_arg(str(f))


def test_two_shares_with_one_tag_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ShareError, match="tag 'x' is used by"):
        validate_shares([f"{tmp_path / 'a'}=x", ShareConfig(tmp_path / "b", "x")])


def test_microvm_config_reports_a_missing_share_dir_as_config_error(tmp_path):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    with pytest.raises(ConfigError, match="shares\\[0\\] .*no such directory"):
        MicroVMConfig(kernel=kernel, shares=[ShareConfig(tmp_path / "gone", "t")]).validate()


def test_missing_virtiofsd_is_a_one_line_error_naming_the_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("KVMPY_VIRTIOFSD", raising=False)
    monkeypatch.setattr("kvmpy.virtiofsd.CANDIDATES", (str(tmp_path / "nope"),))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(VirtiofsdError, match="no virtiofsd found.*install") as e:
        find_virtiofsd()
    assert "\n" not in str(e.value)


def test_env_override_must_be_an_executable(monkeypatch, tmp_path):
    monkeypatch.setenv("KVMPY_VIRTIOFSD", str(tmp_path / "virtiofsd"))
    with pytest.raises(VirtiofsdError, match="KVMPY_VIRTIOFSD=.*not an executable"):
        find_virtiofsd()


def test_daemon_argv_maps_options_to_each_daemon(tmp_path):
    share = ShareConfig(tmp_path, "t", cache=CacheMode.NEVER)
    qemu = daemon_argv(VirtiofsdBinary("/q", Flavour.QEMU, ""), share, "/s", sandbox="chroot")
    assert qemu[:2] == ["/q", "--socket-path=/s"] and "source=" + str(tmp_path) in qemu
    assert "cache=none" in qemu and "sandbox=chroot" in qemu
    rust = daemon_argv(VirtiofsdBinary("/r", Flavour.RUST, ""), share, "/s", sandbox="none")
    assert f"--shared-dir={tmp_path}" in rust and "--cache=never" in rust and "--sandbox=none" in rust


def test_config_space_is_the_tag_nul_padded_then_the_queue_count():
    raw = CONFIG.pack(b"data", NUM_REQUEST_QUEUES)
    assert len(raw) == 40 and raw[:36] == b"data" + b"\0" * 32
    assert int.from_bytes(raw[36:], "little") == 1


def test_memfd_memory_is_shared_through_its_fd():
    from kvmpy.memory import GuestMemory

    with GuestMemory(2 << 20, memfd=True) as mem:
        (region,) = mem.regions
        assert region.fd >= 0 and region.fd_offset == 0
        mem.write(0x1000, b"guest")
        assert os.pread(region.fd, 5, 0x1000) == b"guest"  # another mapping of the fd sees the same pages
        os.pwrite(region.fd, b"host", 0x2000)
        assert mem.read(0x2000, 4) == b"host"
        fd = region.fd
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with the memory


def test_default_memory_has_no_fd():
    from kvmpy.memory import GuestMemory

    with GuestMemory(1 << 20) as mem:
        assert all(r.fd == -1 for r in mem.regions)
